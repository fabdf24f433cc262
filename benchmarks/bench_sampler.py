"""How fast PackedRowSampler's schedule is planned, and how even the per-rank cost is.

1M ShareGPT-length examples (``prepack.bench.prompts.sample_lengths``, cut at the capacity) are packed
into rows (``prepack.plan``, bfd) and dealt by ``prepack.planner.balance.balance_rows`` to 64 ranks x 8
micro-steps. The balance is reported two ways: the epoch's ``sum over steps of the slowest rank /
sum over steps of the mean rank`` (the time an epoch takes over the time it would take perfectly
balanced), and the worst single step. Goals (issue 28): planning <= 1 s; max/mean <= 1.05 on tokens,
<= 1.10 with the attention term::

    python benchmarks/bench_sampler.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from prepack import plan
from prepack.planner.balance import attention_coefficient, balance_rows, row_costs
from prepack.bench.prompts import sample_lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=1_000_000)
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--micro-steps", type=int, default=8)
    p.add_argument("--rows-per-micro-batch", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=4096, help="for the attention coefficient a = 12 * hidden")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    lengths = sample_lengths(args.examples, max_len=args.capacity, seed=0)
    a = attention_coefficient(args.hidden_size)
    print(f"{args.examples:,} ShareGPT-length examples (mean {lengths.mean():.0f} tokens), capacity {args.capacity}, "
          f"{args.ranks} ranks x {args.micro_steps} micro-steps x {args.rows_per_micro_batch} row(s); "
          f"attention term a = 12 * {args.hidden_size} = {a:.0f}; median of {args.repeat}")
    times = {"plan": [], "tokens": [], "attention": []}
    for _ in range(args.repeat):
        t = time.perf_counter()
        pl = plan(lengths, args.capacity)
        times["plan"].append(time.perf_counter() - t)
        seq = lengths[pl.order]
        for name, att in (("tokens", None), ("attention", a)):
            t = time.perf_counter()
            costs = row_costs(seq, pl.row_counts, att)
            sched = balance_rows(costs, args.ranks, args.micro_steps, args.rows_per_micro_batch, seed=0)
            times[name].append(time.perf_counter() - t)
    print(f"rows {len(pl.row_counts):,}, optimizer steps per epoch {sched.steps}")
    print("| cost | plan rows (s) | balance (s) | plan + balance (s) | epoch max/mean rank cost | worst step | goal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, att, goal in (("tokens", None, 1.05), ("a·L + L²", a, 1.10)):
        key = "tokens" if att is None else "attention"
        costs = row_costs(seq, pl.row_counts, att)
        sched = balance_rows(costs, args.ranks, args.micro_steps, args.rows_per_micro_batch, seed=0)
        per = np.zeros((sched.steps, args.ranks))
        np.add.at(per, (sched.step, sched.rank), costs)
        epoch = per.max(1).sum() / per.mean(1).sum()
        worst = float((per.max(1) / per.mean(1)).max())
        total = statistics.median(times["plan"]) + statistics.median(times[key])
        met = "met" if epoch <= goal and total <= 1.0 else "NOT met"
        print(f"| {name} | {statistics.median(times['plan']):.3f} | {statistics.median(times[key]):.3f} | {total:.3f} | "
              f"{epoch:.4f} | {worst:.4f} | <= {goal} and <= 1 s: {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
