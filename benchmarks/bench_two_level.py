"""Two-level prefix sharing against an older checkout's sharing: a GRPO-shaped batch (a benchmark, not a test).

Every prompt is a ``--header``-token few-shot header (ShareGPT text) shared by all prompts, then its own
ShareGPT question of 100-300 tokens; each prompt is sampled ``--samples`` times (``num_return_sequences``,
seeded, ``top_k=1`` so that both checkouts must give the same tokens), ``--new-tokens`` new tokens each,
llama-small fp32. ``prepack.generate`` runs it in this checkout and in ``--baseline`` (a checkout of an older
commit, e.g. the one-level sharing of before), each measurement a fresh child process, alternating
(A B B A ...), after a warm-up in each child. Reported: each checkout's median seconds, the speed-up, the
peak KV bytes against the unique live tokens (a region counted once), and whether the tokens agree.

    git worktree add /tmp/base <commit>
    python benchmarks/bench_two_level.py --baseline /tmp/base                       # the issue's workload
    python benchmarks/bench_two_level.py --baseline /tmp/base --prompts 8 --new-tokens 16 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench_regression import run_child  # one fresh process per measurement, importing the checkout's prepack

CHILD = r"""
import hashlib, json, sys, time
import numpy as np, torch
import prepack
from prepack.bench.models import build_model
from prepack.bench.prompts import fit_vocab, source_prompts
if hasattr(prepack, "_moved"):  # the subpackage layout; an older checkout has the flat one
    from prepack.jobs.generation import generate_with_backends
else:
    from prepack.generation import generate_with_backends

n, header_len, samples, new = (int(a) for a in sys.argv[1:5])
model = build_model("llama-small")
vocab = model.config.vocab_size
pool = source_prompts("sharegpt", vocab_size=vocab, n=4 * n + 64, seed=0)
order = np.random.default_rng(0).permutation(len(pool))
questions = [list(pool[i]) for i in order if 100 <= len(pool[i]) <= 300][:n]
header = [t for i in order if len(pool[i]) > 500 for t in pool[i]][:header_len]
seqs = fit_vocab([header + q for q in questions], vocab)[0]
kwargs = dict(max_new_tokens=new, do_sample=True, top_k=1, num_return_sequences=samples, seed=0, pad_token_id=0,
              return_logprobs=True, progress=False)
generate_with_backends(model, seqs[:2], **{**kwargs, "max_new_tokens": 2})  # warm-up
t = time.perf_counter()
got = generate_with_backends(model, seqs, **kwargs)
seconds = time.perf_counter() - t
s = got.stats
digest = hashlib.sha256(json.dumps([c.tokens.tolist() for c in got.results]).encode()).hexdigest()
print(json.dumps({
    "seconds": seconds, "tokens": digest, "peak_kv_bytes": s.peak_kv_bytes, "peak_live_tokens": s.peak_live_tokens,
    "kv_bytes_per_token": s.kv_bytes_per_token, "regions": s.prefix_regions, "prompt_tokens_run": sum(s.prompt_tokens),
    "prompt_tokens": sum(map(len, seqs)) * samples, "prepack": prepack.__file__,
}))
"""


def measure(checkout: Path, args) -> dict:
    return run_child(checkout, CHILD, [str(a) for a in (args.prompts, args.header, args.samples, args.new_tokens)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare against")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--header", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="measurements per checkout")
    args = ap.parse_args(argv)
    here, base = Path(__file__).resolve().parents[1], args.baseline.resolve()
    if not (base / "prepack" / "__init__.py").is_file():
        ap.error(f"--baseline {base} holds no prepack/ checkout")
    rows: dict = {here: [], base: []}
    for r in range(args.rounds):
        for checkout in ((here, base) if r % 2 == 0 else (base, here)):
            rows[checkout].append(measure(checkout, args))
            print(f"round {r}: {checkout.name}: {rows[checkout][-1]['seconds']:.1f} s", file=sys.stderr)
    print(f"{args.prompts} prompts = a {args.header}-token header + a 100-300-token ShareGPT question, "
          f"x {args.samples} samples, {args.new_tokens} new tokens, llama-small fp32, {args.rounds} rounds\n")
    print("| checkout | seconds (median) | prompt tokens run / in the requests | regions | peak KV MB | peak KV / unique live tokens |")
    print("|---|---|---|---|---|---|")
    for name, checkout in (("this", here), ("baseline", base)):
        last = rows[checkout][-1]
        kv_ratio = last["peak_kv_bytes"] / (last["peak_live_tokens"] * last["kv_bytes_per_token"])
        print(f"| {name} | {statistics.median(x['seconds'] for x in rows[checkout]):.2f} | "
              f"{last['prompt_tokens_run']} / {last['prompt_tokens']} | {last['regions']} | "
              f"{last['peak_kv_bytes'] / 2**20:.1f} | {kv_ratio:.2f} |")
    mine = statistics.median(x["seconds"] for x in rows[here])
    theirs = statistics.median(x["seconds"] for x in rows[base])
    same = {x["tokens"] for x in rows[here] + rows[base]}
    print(f"\nspeed-up {theirs / mine:.2f}x; same tokens in every run: {len(same) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
