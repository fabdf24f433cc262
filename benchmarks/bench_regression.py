"""Is this checkout as fast as an older one? Each job timed in both, interleaved (a benchmark, not a test).

    git worktree add /tmp/base <commit>
    python benchmarks/bench_regression.py --baseline /tmp/base [--rounds 5] [--models llama-tiny,llama-small] [--jobs prefill,score,mc,generate,shared]

Two versions of prepack cannot share a process (both register attention with transformers
under the same names), so each measurement is a fresh child process run in one checkout or the
other, alternating (A B B A A B ...), with the same model preset, seed and inputs, timed as the
median of 3 after a warm-up. The jobs:

* ``prefill``: ``prepack.prefill`` of 32 ShareGPT first turns cut at 2048 tokens;
* ``score``: ``prepack.score`` of those 32 turns, each split into a context and its last 16 tokens;
* ``mc``: ``prepack.score`` of 16 four-choice questions (a 500-token context shared by its 4 choices of 8 tokens);
* ``generate``: ``prepack.generate`` of 32 turns cut at 512 tokens, 16 new tokens, greedy;
* ``shared``: ``prepack.generate`` of 16 chats sharing a 1,000-token system prompt, 16 new tokens, greedy.

Every child also prints a digest of its outputs; the report says whether both checkouts agree.
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
import hashlib, json, statistics, sys, time, torch
import prepack
from prepack.bench import build_model, load_prompts
model_name, job = sys.argv[1], sys.argv[2]
model = build_model(model_name)
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
turns = load_prompts("sharegpt", 32, max_len=2048, on_long="truncate", seed=0, vocab_size=vocab).token_ids
if job == "prefill":
    run = lambda: prepack.prefill(model, turns).logits.argmax(-1).tolist()
elif job == "score":
    pairs = [(t[:-16], t[-16:]) for t in turns if len(t) > 16]
    run = lambda: [round(s.logprob, 3) for s in prepack.score(model, pairs)]
elif job == "mc":
    pairs = []
    for q in range(16):
        ctx = torch.randint(3, vocab, (500,), generator=g).tolist()
        pairs += [(ctx, torch.randint(3, vocab, (8,), generator=g).tolist()) for _ in range(4)]
    run = lambda: [round(s.logprob, 3) for s in prepack.score(model, pairs)]
elif job == "generate":
    short = [t[:512] for t in turns]
    run = lambda: [getattr(t, "tokens", t).tolist() for t in prepack.generate(model, short, max_new_tokens=16, do_sample=False, pad_token_id=0)]
elif job == "shared":
    system = torch.randint(3, vocab, (1000,), generator=g).tolist()
    chats = [system + t[:200] for t in turns[:16]]
    run = lambda: [getattr(t, "tokens", t).tolist() for t in prepack.generate(model, chats, max_new_tokens=16, do_sample=False, pad_token_id=0)]
else:
    raise SystemExit(f"unknown job {job!r}")
with torch.no_grad():
    out = run()
    times = []
    for _ in range(3):
        t = time.perf_counter(); out = run(); times.append(time.perf_counter() - t)
digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()
print(json.dumps({"seconds": statistics.median(times), "digest": digest, "prepack": prepack.__file__}))
"""


def run_child(checkout: Path, child: str, argv: list[str]) -> dict:
    """Run ``child`` (Python source printing one JSON line) in a fresh process importing ``checkout``'s prepack."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", child, *argv], cwd=checkout, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{argv} failed in {checkout}:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if not row["prepack"].startswith(str(checkout)):
        raise RuntimeError(f"the child imported {row['prepack']}, not the checkout {checkout}")
    return row


def measure(checkout: Path, model: str, job: str) -> dict:
    return run_child(checkout, CHILD, [model, job])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per checkout and model")
    ap.add_argument("--models", default="llama-tiny,llama-small", help="comma-separated model presets")
    ap.add_argument("--jobs", default="prefill,score,mc,generate,shared", help="comma-separated jobs (see above)")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    base = args.baseline.resolve()
    if not (base / "prepack" / "__init__.py").is_file():
        ap.error(f"--baseline {base} holds no prepack/ checkout")
    print("| model | job | this checkout (median s) | baseline (median s) | baseline / this | same outputs |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for job in args.jobs.split(","):
            rows = {here: [], base: []}
            for r in range(args.rounds):
                for checkout in ((here, base) if r % 2 == 0 else (base, here)):
                    rows[checkout].append(measure(checkout, model, job))
            mine = statistics.median(x["seconds"] for x in rows[here])
            theirs = statistics.median(x["seconds"] for x in rows[base])
            same = len({x["digest"] for x in rows[here] + rows[base]}) == 1
            print(f"| {model} | {job} | {mine:.3f} | {theirs:.3f} | {theirs / mine:.2f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
