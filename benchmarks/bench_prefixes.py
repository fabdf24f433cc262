"""A shared system prompt prefilled once against every chat prefilling it (a benchmark, not a test).

    python benchmarks/bench_prefixes.py [--chats 16] [--system 1500] [--repeat 1]
        [--sweep 250,1000,2000,3800 --sweep-chats 8 --plot docs/img/prefix_speedup.png] [--sweep-only]

Workload: --chats chats share a --system-token system prompt (ShareGPT first turns joined and cut,
cl100k ids); each chat's user turn is a different ShareGPT first turn of 20 to 200 tokens. The
llama-small preset (fp32, random weights, CPU) prefills them with ``prepack.prefill``, with shared
prefixes (the default) and with ``share_prefixes=False``, interleaved, --repeat times each after a
warm-up; the medians and their ratio are reported, with the tokens each run put through the model.
The two methods' last-token logits are checked equal (max abs diff <= 1e-4) before any time is
reported.

--sweep reruns the comparison at each system-prompt length (with --sweep-chats chats; a prefix plus a
200-token turn must fit the preset's 4,096 positions) and, with --plot, draws the speed-up against the
prefix length; --sweep-only skips the --chats comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import prepack


def workload(chats: int, system: int, seed: int = 0) -> list[np.ndarray]:
    """``chats`` prompts: one shared ``system``-token prefix, then each its own 20-200-token ShareGPT first turn."""
    from prepack.bench.prompts import sharegpt_token_ids

    ids = sharegpt_token_ids()
    rng = np.random.default_rng(seed)
    turns = [i for i, t in enumerate(ids) if 20 <= len(t) <= 200]
    users = rng.choice(turns, chats, replace=False)
    taken = set(users.tolist())
    head: list[int] = []
    for i, t in enumerate(ids):  # the system prompt: other first turns, back to back, in file order
        if len(head) >= system:
            break
        if i not in taken:
            head += t
    return [np.asarray(head[:system] + ids[u], np.int64) for u in users]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(model, prompts: list[np.ndarray], repeat: int) -> dict:
    """Interleaved prefills with and without sharing: medians, tokens run, the logits gap."""
    prepack.prefill(model, [p[-64:] for p in prompts[:4]])  # warm-up: small shapes, both code paths loaded
    prepack.prefill(model, [p[:80] for p in prompts[:4]])
    times = {True: [], False: []}
    results = {}
    for _ in range(repeat):
        for share in (True, False):
            seconds, results[share] = timed(lambda share=share: prepack.prefill(model, prompts, share_prefixes=share))
            times[share].append(seconds)
    gap = float((results[True].logits - results[False].logits).abs().max())
    if gap > 1e-4:
        raise AssertionError(f"last-token logits with and without shared prefixes differ by {gap:.2e}")
    shared, whole = statistics.median(times[True]), statistics.median(times[False])
    return dict(
        chats=len(prompts), shared_s=shared, whole_s=whole, speedup=whole / shared,
        tokens_shared_run=results[True].tokens_run, tokens_whole_run=results[False].tokens_run,
        saved=results[True].shared_tokens, logits_gap=gap,
    )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["prefix"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(x, [r["speedup"] for r in rows], "o-", label="measured")
    ax.plot(x, [r["tokens_whole_run"] / r["tokens_shared_run"] for r in rows], "--", color="gray", label="tokens ratio")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("shared system prompt (tokens)")
    ax.set_ylabel("prefill speed-up over share_prefixes=False")
    ax.set_title(f"{rows[0]['chats']} chats, llama-small fp32, CPU")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--system", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=[])
    parser.add_argument("--sweep-chats", type=int, default=8)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from prepack.bench.models import build_model

    model = build_model("llama-small")
    if not args.sweep_only:
        row = compare(model, workload(args.chats, args.system), args.repeat)
        print(
            f"{row['chats']} chats, {args.system}-token system prompt: shared {row['shared_s']:.2f} s "
            f"({row['tokens_shared_run']} tokens run, {row['saved']} saved), share_prefixes=False {row['whole_s']:.2f} s "
            f"({row['tokens_whole_run']} tokens): {row['speedup']:.2f}x; logits max abs diff {row['logits_gap']:.1e}"
        )
    rows = []
    for prefix in args.sweep:
        r = compare(model, workload(args.sweep_chats, prefix), args.repeat)
        r["prefix"] = prefix
        rows.append(r)
        print(
            f"  sweep: {prefix:5d}-token prefix, {r['chats']} chats: {r['speedup']:.2f}x "
            f"(shared {r['shared_s']:.2f} s, whole {r['whole_s']:.2f} s, tokens ratio {r['tokens_whole_run'] / r['tokens_shared_run']:.2f})"
        )
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
