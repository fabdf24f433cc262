"""Whole-dataset packing speed, memory and fill on real ShareGPT lengths (a benchmark, not a test).

    HF_HUB_OFFLINE=1 python benchmarks/bench_pack_dataset.py [--rows 1000000] [--capacity 4096]

Builds an in-memory ``datasets.Dataset`` of ``--rows`` token lists whose
lengths are drawn from the ShareGPT prompt-length distribution (random int32
ids; building it is not timed, tokenization is not part of it), then reports:

1. ``prepack.pack_dataset`` end to end: input examples per second, fill and
   gap to the L2 bound, with user and kernel CPU time per run. The first run
   is reported on its own: on this VM, faulting in memory the process has
   never touched costs seconds of kernel time, and some later runs pay part
   of that again (runs 2.. are reported one by one, with median and best).
2. Fill against pool size (1k, 10k, 100k, the whole dataset).
3. The ``Dataset.map(batched=True)`` paths against TRL's ``pack_dataset``,
   per 1000-example map batch (TRL's default) and over the whole dataset
   (``map_kwargs={"batch_size": None}``), with each one's peak memory
   measured in a fresh process.
4. The PyPI ``binpacking`` package against prepack on 10k and 30k items.

Times are medians (and bests) of several runs in this one process, so ratios
hold even when another job shares the machine; absolute figures move with its
load. Peak memory is measured in a fresh process per packer, because pyarrow's
memory pool keeps what earlier calls freed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from prepack.bench.prompts import sample_lengths
from prepack.data.fronts import pack_dataset, pack_examples, pack_stats
from prepack.planner.bins import lower_bound_l2, plan

GOAL_ROWS_PER_S = 500_000
# The figures in docs/data_pipeline.md ("Warm throughput") were taken with every layout column stored;
# benchmarks/bench_pack_cold_start.py measures the lean default.
SCHEMA = "full"
PACKERS = {  # name -> (what it is, what one plan sees); see packer()
    "prepack_map": ("prepack `Dataset.map(pack_examples)`", "one map batch"),
    "prepack_whole": ("prepack `pack_dataset`", "whole dataset"),
    "trl_batch": ("TRL `pack_dataset(strategy=\"bfd\")`", "one map batch"),
    "trl_whole": ("TRL `pack_dataset(strategy=\"bfd\")`, `batch_size=None`", "whole dataset"),
}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def build_dataset(lengths: np.ndarray, seed: int = 0):
    """A ``datasets.Dataset`` with one ``input_ids`` column: len(lengths) lists of random int32 ids, no Python objects."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.random.default_rng(seed).integers(0, 100_352, int(offsets[-1]), dtype=np.int32)
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
    return datasets.Dataset(InMemoryTable(table), fingerprint=f"bench-{len(lengths)}-{seed}")


def bench_dataset(args):
    """The benchmark's data (same in the parent and the --child-peak processes): lengths (N,) and the Dataset."""
    lengths = sample_lengths(args.rows, max_len=args.capacity, seed=0)
    return lengths, build_dataset(lengths)


def packer(name: str, ds, capacity: int, batch_size: int) -> Callable[[], Any]:
    """The packing call ``name`` (a key of PACKERS) on ``ds``, ready to run."""
    if name == "prepack_map":
        return lambda: ds.with_format("arrow").map(
            functools.partial(pack_examples, capacity=capacity, schema=SCHEMA), batched=True, batch_size=batch_size,
            with_indices=True, remove_columns=ds.column_names,
        ).with_format(None)
    if name == "prepack_whole":
        return lambda: pack_dataset(ds, capacity, schema=SCHEMA)
    from trl import pack_dataset as trl_pack_dataset

    map_kwargs = {"batch_size": batch_size if name == "trl_batch" else None}
    return lambda: trl_pack_dataset(ds, seq_length=capacity, strategy="bfd", map_kwargs=map_kwargs)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few ms by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.growth = interval, 0

    def __enter__(self) -> Self:
        self._start = self._peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(self._peak, _rss()) - self._start


def peak_in_fresh_process(name: str, args) -> int:
    """Peak RSS growth (bytes) of one run of packer ``name``, in a new interpreter.

    Measured in-process, pyarrow's memory pool (jemalloc / mimalloc) keeps what
    earlier calls freed, and a later call reuses it and looks free; a fresh
    process starts every packer from the same state.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child-peak", name, "--rows", str(args.rows),
           "--capacity", str(args.capacity), "--map-batch-size", str(args.map_batch_size)]
    if args.trl_rows is not None:
        cmd += ["--trl-rows", str(args.trl_rows)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def _child_peak(args) -> None:
    """Build the data, run one packing call, print its peak RSS growth in bytes (the --child-peak mode)."""
    import datasets

    datasets.disable_progress_bars()
    _, ds = bench_dataset(args)
    if args.child_peak.startswith("trl") and args.trl_rows is not None:
        ds = ds.select(range(min(args.rows, args.trl_rows))).flatten_indices()
    fn = packer(args.child_peak, ds, args.capacity, args.map_batch_size)
    gc.collect()
    start, before = _rss(), _maxrss()
    with PeakRSS() as mem:
        fn()
    # ru_maxrss catches a peak between two samples, but only once the call outgrows the process's earlier high-water mark
    after = _maxrss()
    print(max(mem.growth, after - start) if after > before else mem.growth)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Runs:
    """Per-run figures of one measured call: wall seconds, user and kernel CPU seconds, minor page faults."""

    wall: list[float]
    user: list[float]
    kernel: list[float]
    faults: list[int]

    def median(self, what: str = "wall") -> float:
        return statistics.median(getattr(self, what))


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Runs, Any]:
    """Run fn ``repeat`` times. Returns the figures of each run and the last result."""
    runs, out = Runs([], [], [], []), None
    for _ in range(repeat):
        out = None  # free the previous result first, so every run starts from the same memory level
        gc.collect()
        r, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = fn()
        runs.wall.append(time.perf_counter() - t)
        r2 = resource.getrusage(resource.RUSAGE_SELF)
        runs.user.append(r2.ru_utime - r.ru_utime)
        runs.kernel.append(r2.ru_stime - r.ru_stime)
        runs.faults.append(r2.ru_minflt - r.ru_minflt)
    return runs, out


def rows_and_tokens(packed) -> tuple[int, int]:
    """(rows, real tokens) of packed rows from any packer, read from the Arrow ``input_ids`` column."""
    import pyarrow.compute as pc

    col = packed.with_format("arrow")[:].column("input_ids")
    return packed.num_rows, int(pc.sum(pc.list_value_length(col)).as_py())


def _wall(runs: Runs) -> str:
    return f"{runs.median():.2f} s ({min(runs.wall):.2f} s)"


def _rate(n: int, runs: Runs) -> str:
    return f"{n / runs.median():,.0f} ({n / min(runs.wall):,.0f})"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="examples in the dataset")
    ap.add_argument("--capacity", type=int, default=4096, help="tokens per packed row (also the longest example)")
    ap.add_argument("--repeat", type=int, default=5, help="pack_dataset runs after the first, for the end-to-end median")
    ap.add_argument("--compare-repeat", type=int, default=5, help="runs per row of the pool and comparison tables")
    ap.add_argument("--pools", default="1000,10000,100000,all", help="pool sizes for the fill table")
    ap.add_argument("--map-batch-size", type=int, default=1000, help="map() batch size (TRL's default is 1000)")
    ap.add_argument("--trl-rows", type=int, default=None, help="run TRL on only the first N examples (default: all)")
    ap.add_argument("--binpacking-sizes", default="10000,30000")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    ap.add_argument("--child-peak", choices=PACKERS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_peak:
        _child_peak(args)
        return 0
    C, N, B = args.capacity, args.rows, args.map_batch_size

    import datasets

    datasets.disable_progress_bars()
    lengths, ds = bench_dataset(args)
    l2 = lower_bound_l2(lengths, C)
    tokens = int(lengths.sum())
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with other jobs; "
          f"python {platform.python_version()}, numpy {np.__version__}, datasets {datasets.__version__}")
    print(f"data: {N:,} examples, {tokens:,} tokens (int32, {gib(4 * tokens)}), lengths from ShareGPT prompts "
          f"cut at {C} (mean {lengths.mean():.0f}, median {np.median(lengths):.0f}); capacity {C}; L2 bound {l2:,} rows\n")

    # --- 1. end to end ---------------------------------------------------------------------------
    runs, packed = timed(lambda: pack_dataset(ds, C, schema=SCHEMA), 1 + args.repeat)
    stats = pack_stats(packed, C)
    assert stats.num_examples == N and stats.num_tokens == tokens and stats.num_truncated_tokens == 0
    out_bytes = packed.data.nbytes
    del packed
    print("### prepack.pack_dataset, whole dataset, end to end\n")
    print("| run | wall | examples/s | user CPU | kernel CPU | minor page faults |")
    print("|---|---:|---:|---:|---:|---:|")
    for i in range(len(runs.wall)):
        label = "1 (first)" if i == 0 else str(i + 1)
        print(f"| {label} | {runs.wall[i]:.2f} s | {N / runs.wall[i]:,.0f} | {runs.user[i]:.2f} s | {runs.kernel[i]:.2f} s "
              f"| {runs.faults[i]:,} |")
    warm = Runs(runs.wall[1:], runs.user[1:], runs.kernel[1:], runs.faults[1:]) if args.repeat else runs
    print(f"\n{stats.num_rows:,} rows, fill {stats.efficiency:.4%}, over L2 {stats.gap_to_l2:.4%}; "
          f"output columns {gib(out_bytes)}")
    print(f"runs 2-{len(runs.wall)}: median {warm.median():.2f} s = {N / warm.median():,.0f} examples/s, "
          f"best {min(warm.wall):.2f} s = {N / min(warm.wall):,.0f} examples/s; first run {N / runs.wall[0]:,.0f} examples/s")
    print(f"per run: user CPU {min(runs.user):.2f}-{max(runs.user):.2f} s, kernel CPU {min(runs.kernel):.2f}-"
          f"{max(runs.kernel):.2f} s, minor page faults {min(runs.faults):,}-{max(runs.faults):,}")
    verdict = "met" if N / warm.median() >= GOAL_ROWS_PER_S else "NOT met"
    print(f"goal >= {GOAL_ROWS_PER_S:,} examples/s end to end: {verdict} at the median of runs 2-{len(runs.wall)}, "
          f"{'met' if N / runs.wall[0] >= GOAL_ROWS_PER_S else 'NOT met'} on the first run\n")

    # --- 2. pool size ----------------------------------------------------------------------------
    print(f"### Fill against pool size: pack_dataset(pool_size=...), {args.compare_repeat} runs each\n")
    print("| pool | rows | fill | over L2 | wall, median (best) | examples/s, median (best) | user CPU | kernel CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.pools.split(","):
        pool = None if spec == "all" else int(spec)
        runs, out = timed(lambda pool=pool: pack_dataset(ds, C, pool_size=pool, schema=SCHEMA), args.compare_repeat)
        s = pack_stats(out, C)
        del out
        label = f"all ({N:,})" if pool is None else f"{pool:,}"
        print(f"| {label} | {s.num_rows:,} | {s.efficiency:.4%} | {s.gap_to_l2:.4%} | {_wall(runs)} | {_rate(N, runs)} "
              f"| {runs.median('user'):.2f} s | {runs.median('kernel'):.2f} s |")
    print()

    # --- 3. map() paths and TRL ------------------------------------------------------------------
    names = [n for n in PACKERS if not (args.skip_trl and n.startswith("trl"))]
    n_trl = N if args.trl_rows is None else min(N, args.trl_rows)
    sub = ds if n_trl == N else ds.select(range(n_trl)).flatten_indices()
    results = {}  # name -> (examples, rows, real tokens, median seconds)
    for name in names:
        data = sub if name.startswith("trl") else ds
        runs, out = timed(packer(name, data, C, B), args.compare_repeat)
        results[name] = (len(data), *rows_and_tokens(out), runs)
        del out
    peaks = {} if args.skip_memory else {name: peak_in_fresh_process(name, args) for name in names}

    print(f"### Map-batch and whole-dataset packers, same data (map batch {B:,}; median of {args.compare_repeat} runs)\n")
    if n_trl != N and not args.skip_trl:
        print(f"TRL ran on the first {n_trl:,} examples only (--trl-rows); its rows, fill and L2 gap are for that subset.\n")
    print("| packer | one plan sees | rows | fill | over L2 | wall, median (best) | examples/s, median (best) "
          "| user CPU | kernel CPU | peak RSS growth (fresh process) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, rows, real, runs) in results.items():
        bound = l2 if n == N else lower_bound_l2(lengths[:n], C)
        what, scope = PACKERS[name]
        peak = gib(peaks[name]) if name in peaks else "-"
        print(f"| {what} | {scope} | {rows:,} | {real / (rows * C):.4%} | {rows / bound - 1:.4%} | {_wall(runs)} "
              f"| {_rate(n, runs)} | {runs.median('user'):.2f} s | {runs.median('kernel'):.2f} s | {peak} |")
    if not args.skip_trl:
        import trl

        print(f"\nTRL {trl.__version__}.")
        rate = {name: n / runs.median() for name, (n, _, _, runs) in results.items()}
        for mine, theirs in (("prepack_map", "trl_batch"), ("prepack_whole", "trl_batch"), ("prepack_whole", "trl_whole")):
            print(f"- {PACKERS[mine][0]} ({PACKERS[mine][1]}) vs TRL ({PACKERS[theirs][1]}): "
                  f"{rate[mine] / rate[theirs]:.1f}x the examples/s (medians)")
    print()

    # --- 4. binpacking ---------------------------------------------------------------------------
    import binpacking

    print("### PyPI `binpacking.to_constant_volume` against prepack, same items (prepack: median of 5)\n")
    print("| items | binpacking | prepack `plan()` | ratio | prepack `pack_dataset` (plan + rows) | ratio | rows (binpacking / prepack) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in map(int, args.binpacking_sizes.split(",")):
        small = sample_lengths(n, max_len=C, seed=1)
        small_ds = build_dataset(small, seed=1)
        t_bp, bins = timed(lambda small=small: binpacking.to_constant_volume(dict(enumerate(small.tolist())), C), 1)
        t_plan, p = timed(lambda small=small: plan(small, C), 5)
        t_pack, _ = timed(lambda small_ds=small_ds: pack_dataset(small_ds, C, schema=SCHEMA), 5)
        bp, tp, tk = t_bp.wall[0], t_plan.median(), t_pack.median()
        print(f"| {n:,} | {bp:.2f} s | {tp * 1e3:.1f} ms | {bp / tp:,.0f}x | {tk * 1e3:.1f} ms | {bp / tk:,.0f}x "
              f"| {len(bins):,} / {p.num_rows:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
