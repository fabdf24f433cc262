"""Planner speed goals (issue 16) and row quality, on three length distributions (a benchmark, not a test).

    python benchmarks/bench_planner.py [--repeat 21] [--big-repeat 5]

Goals: ``plan(lengths, capacity)`` (bfd, full row/offset assignments) takes
<= 1 ms for 1,000 lengths and <= 5 ms for 10,000, whatever their
distribution, and <= 0.15 s for 1M ShareGPT lengths. Each case runs at
capacity 4096 and at 8192 (the serving path plans every forward against its
token budget). Times are medians of interleaved runs: every repeat runs each
case once, so a noisy machine slows all cases alike.

Quality: rows used against the Martello-Toth L2 lower bound, and against the
rows the planner used before the issue-16 rewrite (commit 857f8a2, recorded
below for these exact inputs): never more.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from prepack import plan
from prepack.bench.prompts import sample_lengths

# Goal per size: seconds for one plan() call.
GOALS = {1_000: 1e-3, 10_000: 5e-3, 1_000_000: 0.15}

# Rows bfd used at commit 857f8a2 (before the rewrite) on the inputs below: (distribution, items, capacity) -> rows.
ROWS_BEFORE = {
    ("uniform 1..4096", 1_000, 4096): 539, ("uniform 1..4096", 10_000, 4096): 5032,
    ("bimodal", 1_000, 4096): 527, ("bimodal", 10_000, 4096): 5010,
    ("ShareGPT", 1_000, 4096): 54, ("ShareGPT", 10_000, 4096): 571,
    ("uniform 1..4096", 1_000, 8192): 259, ("uniform 1..4096", 10_000, 8192): 2502,
    ("bimodal", 1_000, 8192): 218, ("bimodal", 10_000, 8192): 2083,
    ("ShareGPT", 1_000, 8192): 27, ("ShareGPT", 10_000, 8192): 286,
    ("ShareGPT", 1_000_000, 4096): 57309, ("ShareGPT", 1_000_000, 8192): 28655,
}


def make_lengths(distribution: str, n: int, seed: int = 0) -> np.ndarray:
    """(n,) int64 lengths in 1..4096: uniform, bimodal (half chat-short 1..512, half long 2048..4096), or ShareGPT."""
    rng = np.random.default_rng(seed)
    if distribution == "uniform 1..4096":
        return rng.integers(1, 4097, n)
    if distribution == "bimodal":
        return np.where(rng.random(n) < 0.5, rng.integers(1, 513, n), rng.integers(2048, 4097, n))
    if distribution == "ShareGPT":
        return sample_lengths(n, max_len=4096, seed=seed)
    raise ValueError(f"unknown distribution {distribution!r}")


def median_times(cases: list, repeat: int) -> list[float]:
    """Median seconds per case, the cases interleaved within each repeat."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeat):
        for t, (lengths, capacity) in zip(times, cases):
            start = time.perf_counter()
            plan(lengths, capacity)
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=21, help="runs per 1k/10k case")
    ap.add_argument("--big-repeat", type=int, default=5, help="runs per 1M case")
    args = ap.parse_args()

    small = [(d, n, c) for c in (4096, 8192) for d in ("uniform 1..4096", "bimodal", "ShareGPT") for n in (1_000, 10_000)]
    big = [("ShareGPT", 1_000_000, c) for c in (4096, 8192)]
    medians = {}
    for keys, repeat in ((small, args.repeat), (big, args.big_repeat)):
        cases = [(make_lengths(d, n), c) for d, n, c in keys]
        plan(*cases[0])  # warm up imports and caches outside the timings
        medians.update(zip(keys, median_times(cases, repeat)))

    print("| lengths | items | capacity | plan() median | goal | met | rows | L2 | rows before (857f8a2) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    all_met = True
    for key in small + big:
        d, n, c = key
        p = plan(make_lengths(d, n), c)
        dt, goal = medians[key], GOALS[n]
        met = dt <= goal
        all_met &= met
        before = ROWS_BEFORE[key]
        rows = f"{p.num_rows:,}" + ("" if p.num_rows <= before else " (MORE)")
        fmt = (lambda s: f"{s:.3f} s") if n >= 1_000_000 else (lambda s: f"{s * 1e3:.2f} ms")
        print(f"| {d} | {n:,} | {c} | {fmt(dt)} | {fmt(goal)} | {'yes' if met else 'NO'} | {rows} | {p.lower_bound_l2:,} | {before:,} |")
    print(f"\nall goals met: {'yes' if all_met else 'no'}")


if __name__ == "__main__":
    main()
