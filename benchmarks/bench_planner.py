"""Planner speed and quality on real ShareGPT prompt lengths (a benchmark, not a test).

    python benchmarks/bench_planner.py [--sizes 1000000,16000000] [--capacity 4096]

For each size: plan() time (median of --repeat runs, full row/offset
assignments), rows used, fill, and the gap to the L1 and L2 lower bounds, for
bfd and ffd. Then the PyPI ``binpacking`` package (the prepacking paper's
choice) against bfd on the same 10k and 30k items, as a time ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from prepack import plan
from prepack.bench.prompts import sample_lengths


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,16000000")
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--binpacking-sizes", default="10000,30000")
    args = ap.parse_args()
    C = args.capacity

    print(f"lengths: sampled from ShareGPT first-turn cl100k lengths (empty prompts dropped, cut at {C}); capacity {C}\n")
    print("| items | algorithm | plan() median | rows | L1 | L2 | over L2 | fill |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in map(int, args.sizes.split(",")):
        lengths = sample_lengths(n, max_len=C, seed=0)
        for algorithm in ("bfd", "ffd"):
            repeat = args.repeat if n <= 2_000_000 else max(1, args.repeat // 2)
            dt, p = timed(lambda: plan(lengths, C, algorithm=algorithm), repeat)
            l1, l2 = p.lower_bound_l1, p.lower_bound_l2
            print(f"| {n:,} | {algorithm} | {dt:.3f} s | {p.num_rows:,} | {l1:,} | {l2:,} | {(p.num_rows - l2) / l2:.4%} | {p.efficiency:.4%} |")

    print("\n| items | binpacking.to_constant_volume | prepack bfd | ratio | rows (binpacking / bfd) |")
    print("|---:|---:|---:|---:|---:|")
    import binpacking

    for n in map(int, args.binpacking_sizes.split(",")):
        lengths = sample_lengths(n, max_len=C, seed=1)
        t = time.perf_counter()
        bins = binpacking.to_constant_volume({i: int(v) for i, v in enumerate(lengths)}, C)
        t_bp = time.perf_counter() - t
        t_bfd, p = timed(lambda: plan(lengths, C), 5)
        print(f"| {n:,} | {t_bp:.2f} s | {t_bfd * 1e3:.1f} ms | {t_bp / t_bfd:,.0f}x | {len(bins)} / {p.num_rows} |")


if __name__ == "__main__":
    np.random.seed(0)
    main()
