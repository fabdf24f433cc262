"""Rows over the L2 bound when packing plans each pool on its own (a Ray Data stage, pack_dataset(pool_size=...)).

    python benchmarks/bench_pool_gap.py [--rows 4000000] [--pools 10000,100000,1000000]

Draws ``--rows`` ShareGPT prompt lengths (cut at the capacity), plans every
pool of consecutive lengths with ``prepack.plan`` (exactly what
``pack_table(pool_size=...)`` and each Ray batch do), and compares the total
rows with the L2 lower bound of the whole corpus. Planner only: no tokens.
"""

from __future__ import annotations

import argparse
import time

from prepack.bench import sample_lengths
from prepack.planner.bins import lower_bound_l2, plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--pools", default="10000,100000,1000000")
    args = ap.parse_args(argv)
    lengths = sample_lengths(args.rows, max_len=args.capacity, seed=0)
    l2 = lower_bound_l2(lengths, args.capacity)
    print(f"{args.rows:,} ShareGPT prompt lengths cut at {args.capacity} (mean {lengths.mean():.0f}); "
          f"capacity {args.capacity}; L2 bound of the whole corpus {l2:,} rows\n")
    print("| pool (rows per plan) | plans | rows | over L2 of the whole corpus | fill | planner time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for pool in map(int, args.pools.split(",")):
        t = time.perf_counter()
        rows = sum(plan(lengths[s : s + pool], args.capacity).num_rows for s in range(0, len(lengths), pool))
        took = time.perf_counter() - t
        fill = lengths.sum() / (rows * args.capacity)
        print(f"| {pool:,} | {-(-len(lengths) // pool):,} | {rows:,} | {rows / l2 - 1:.4%} | {fill:.4%} | {took:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
