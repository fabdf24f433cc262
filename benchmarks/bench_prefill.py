"""Packed prefill against padded prefill on CPU, checked against the issue's efficiency goals (a benchmark, not a test).

    python benchmarks/bench_prefill.py [--batch-size 32] [--max-len 2048] [--seed 0] [--repeat 3]

The comparison is ``prepack.bench.run_bench`` (the engine of ``prepack bench``):
the llama-small preset (hidden 1024, 4 layers, 16 heads, 4 KV heads, fp32,
random weights), ShareGPT first turns drawn with --seed and cut at --max-len,
methods interleaved, medians over --repeat, every method's next token checked
first. prepack's time includes the scatter into the left-padded cache that
``model.generate`` continues from. On top, this script reports:

* the share of prepack's time spent planning, packing and scattering KV;
* peak RSS growth against padded's (see ``prepack.bench.measure`` for what it counts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import prepack
from prepack.bench import build_model, format_table, load_prompts, run_bench
from prepack.data.batch import pack_plan


def median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = build_model("llama-small")
    config = model.config
    ps = load_prompts("sharegpt", args.batch_size, max_len=args.max_len, on_long="truncate", seed=args.seed,
                      vocab_size=config.vocab_size)
    seqs = ps.token_ids
    lengths = np.array([len(s) for s in seqs])
    real, padded_tokens = int(lengths.sum()), len(seqs) * int(lengths.max())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(seqs)} ShareGPT prompts (seed {args.seed}, "
          f"{ps.num_long} cut at {args.max_len}): {real} real tokens, longest {lengths.max()}, {padded_tokens} padded: "
          f"token-ratio bound {padded_tokens / real:.2f}x\n")

    rows = run_bench(model, seqs, metrics=("prefill",), methods=("padded", "prepack:sdpa_masked", "prepack"),
                     repeat=args.repeat, warmup=1)
    print(format_table(rows))
    by = {r["method"]: r for r in rows}
    ours, pad, dense = (by[m]["median_s"] for m in ("prepack", "padded", "prepack:sdpa_masked"))

    tokens = [np.asarray(s) for s in seqs]
    t_pack = median_time(lambda: pack_plan(prepack.plan(lengths, real), tokens), 10)
    with torch.no_grad():
        result = prepack.prefill(model, seqs)
        t_prefill = median_time(lambda: prepack.prefill(model, seqs), args.repeat)
        t_scatter = median_time(result.left_padded_cache, args.repeat)
    print(f"plan + pack {t_pack * 1e3:.1f} ms, KV scatter into the left-padded DynamicCache {t_scatter * 1e3:.0f} ms, "
          f"prefill without them {t_prefill:.2f} s: {(t_pack + t_scatter) / (t_prefill + t_scatter):.1%} of prepack's prefill")
    print(f"\nprepack vs padded {pad / ours:.2f}x = {pad / ours / (padded_tokens / real):.2f}x the token bound; "
          f"vs prepack:sdpa_masked (dense-mask prepacking) {dense / ours:.2f}x; peak RSS growth "
          f"{by['prepack']['mem_growth_mb'] / by['padded']['mem_growth_mb']:.2f} of padded's")


if __name__ == "__main__":
    main()
