"""The default token budget against fixed budgets: time and peak memory of a large packed prefill (a benchmark).

    python benchmarks/bench_token_budget.py [--n 2000] [--model llama-small] [--budgets 4096,8192,16384,32768] [--repeat 2]
        [--plot docs/img/token_budget.png]

N ShareGPT first turns (cl100k tokens, cut at 4096) go through ``prepack.prefill`` once per
budget: the default (``prepack.hf.model.default_token_budget``) and each fixed one. Every
measurement runs in a fresh subprocess, round-robin over the budgets, so that its peak RSS
(``ru_maxrss``) is its own; the time is the prefill alone, after a small warm-up prefill in the
same process. Memory is reported against what the prefill returns (the packed keys and values
plus the (N, V) last-token logits) and against one forward's activations, measured as the peak
growth of prefilling a single budget's worth of prompts minus what that returns.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args) -> None:
    import torch

    import prepack
    from prepack.bench import build_model, load_prompts
    from prepack.hf.model import default_token_budget

    torch.manual_seed(0)
    model = build_model(args.model)
    seqs = load_prompts("sharegpt", args.n, max_len=4096, on_long="truncate", vocab_size=model.config.vocab_size).token_ids
    budget = None if args.child == "default" else int(args.child)
    with torch.no_grad():
        prepack.prefill(model, seqs[:8], token_budget=budget)  # warm-up: thread pools, allocator
        if args.first_wave:  # only the prompts of one forward: its activations, and what it returns
            resolved = budget or default_token_budget(model)
            total, keep = 0, []
            for s in seqs:
                if total + len(s) > resolved:
                    break
                keep.append(s)
                total += len(s)
            seqs = keep
        before = _rss()
        t = time.perf_counter()
        result = prepack.prefill(model, seqs, token_budget=budget)
        seconds = time.perf_counter() - t
    kv = sum(x.numel() * x.element_size() for chunk in result.chunks for layer in chunk for x in layer)
    logits = result.logits.numel() * result.logits.element_size()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(
        budget=args.child, seconds=seconds, before=before, peak=peak, kv=kv, logits=logits,
        forwards=len(result.chunks), tokens=int(result.lengths.sum()), resolved=budget or default_token_budget(model),
    )))


def run(args, budget: str, first_wave: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", budget, "--n", str(args.n), "--model", args.model]
    out = subprocess.run(cmd + (["--first-wave"] if first_wave else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--model", default="llama-small")
    ap.add_argument("--budgets", default="4096,8192,16384,32768")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--plot", default=None, help="write a PNG: prefill time and peak RSS growth against the budget")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--first-wave", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    budgets = ["default", *args.budgets.split(",")]
    runs: dict[str, list[dict]] = {b: [] for b in budgets}
    for r in range(args.repeat):
        for b in budgets:
            runs[b].append(run(args, b))
            print(f"repeat {r} budget {b}: {runs[b][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    first = {b: run(args, b, first_wave=True) for b in budgets}
    mb = 1 << 20
    x = runs["default"][0]
    print(f"{args.n} ShareGPT prompts, {x['tokens']} tokens, {args.model} fp32 on CPU; median of {args.repeat} "
          "fresh processes per budget, round-robin\n")
    print("| token_budget | forwards | prefill s | vs default | peak RSS growth MB | KV + logits MB | one forward's activations MB | growth / (1.2 KV + act) |")
    print("|---|---|---|---|---|---|---|---|")
    t_default = statistics.median(r["seconds"] for r in runs["default"])
    table = []
    for b in budgets:
        rs = runs[b]
        t = statistics.median(r["seconds"] for r in rs)
        growth = statistics.median(r["peak"] - r["before"] for r in rs)
        kept = rs[0]["kv"] + rs[0]["logits"]
        f = first[b]
        act = max(0, (f["peak"] - f["before"]) - (f["kv"] + f["logits"]))
        print(f"| {b} | {rs[0]['forwards']} | {t:.2f} | {t / t_default:.2f}x | {growth / mb:.0f} | {kept / mb:.0f} | "
              f"{act / mb:.0f} | {growth / (1.2 * kept + act):.2f} |")
        table.append(dict(budget=b, seconds=t, growth_mb=growth / mb, kept_mb=kept / mb, act_mb=act / mb))
    if args.plot:
        plot(table, args.plot, f"{args.n} ShareGPT prompts, {x['tokens']} tokens, {args.model} fp32 on CPU, "
             f"median of {args.repeat}; default = {x['resolved']} tokens")


def plot(table: list[dict], path: str, title: str) -> None:
    """Two panels against the fixed budgets: prefill seconds, and peak RSS growth beside what the prefill returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [r for r in table if r["budget"] != "default"]
    default = next(r for r in table if r["budget"] == "default")
    xs = [int(r["budget"]) for r in fixed]
    fig, (tx, mx) = plt.subplots(1, 2, figsize=(11, 4))
    tx.plot(xs, [r["seconds"] for r in fixed], marker="o", label="fixed token_budget")
    tx.axhline(default["seconds"], color="tab:red", ls="--", label="default budget")
    tx.set_ylabel("prefill seconds (median)")
    tx.set_ylim(bottom=0)
    mx.plot(xs, [r["growth_mb"] for r in fixed], marker="o", label="peak RSS growth")
    mx.plot(xs, [r["kept_mb"] for r in fixed], marker="s", ls=":", color="tab:gray", label="KV + logits returned")
    mx.plot(xs, [r["act_mb"] for r in fixed], marker="^", ls=":", color="tab:green", label="one forward's activations")
    mx.axhline(default["growth_mb"], color="tab:red", ls="--", label="default budget: peak RSS growth")
    mx.set_ylabel("MB")
    for ax in (tx, mx):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(b) for b in xs])
        ax.minorticks_off()
        ax.set_xlabel("token_budget (tokens per forward)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
