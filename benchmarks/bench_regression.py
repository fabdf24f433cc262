"""Is this checkout as fast as an older one? Packed prefill timed in both, interleaved (a benchmark, not a test).

    git worktree add /tmp/base <commit>
    python benchmarks/bench_regression.py --baseline /tmp/base [--rounds 5] [--models llama-tiny,llama-small]

Two versions of prepack cannot share a process (both register attention with transformers
under the same names), so each measurement is a fresh child process run in one checkout or the
other, alternating (A B B A A B ...), with the same model preset, seed and prompts: 32 ShareGPT
first turns cut at 2048 tokens, ``prepack.prefill`` timed as the median of 3 after a warm-up.
The report is each checkout's median over rounds, and this checkout's time over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time, torch
import prepack
from prepack.bench import build_model, load_prompts
model = build_model(sys.argv[1])
ps = load_prompts("sharegpt", 32, max_len=2048, on_long="truncate", seed=0, vocab_size=model.config.vocab_size)
seqs = ps.token_ids
with torch.no_grad():
    prepack.prefill(model, seqs)
    times = []
    for _ in range(3):
        t = time.perf_counter(); prepack.prefill(model, seqs); times.append(time.perf_counter() - t)
print(json.dumps({"prefill_s": statistics.median(times), "prepack": prepack.__file__}))
"""


def measure(checkout: Path, model: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model], cwd=checkout, env=env, capture_output=True, text=True, check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if not row["prepack"].startswith(str(checkout)):
        raise RuntimeError(f"the child imported {row['prepack']}, not the checkout {checkout}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per checkout and model")
    ap.add_argument("--models", default="llama-tiny,llama-small", help="comma-separated model presets")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    base = args.baseline.resolve()
    if not (base / "prepack" / "__init__.py").is_file():
        ap.error(f"--baseline {base} holds no prepack/ checkout")
    print("| model | this checkout (median s) | baseline (median s) | this / baseline |")
    print("|---|---|---|---|")
    for model in args.models.split(","):
        times = {here: [], base: []}
        for r in range(args.rounds):
            order = (here, base) if r % 2 == 0 else (base, here)
            for checkout in order:
                times[checkout].append(measure(checkout, model)["prefill_s"])
        mine, theirs = statistics.median(times[here]), statistics.median(times[base])
        print(f"| {model} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
