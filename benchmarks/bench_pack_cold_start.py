"""First-call packing speed, as a user sees it: each measured call runs in a fresh process.

    HF_HUB_OFFLINE=1 python benchmarks/bench_pack_cold_start.py [--rows 200000] [--capacity 4096] [--repeat 5]

A one-shot packing job runs in a new interpreter, so what it pays includes
faulting in every page it writes (the output and any temporaries): on a VM
that is the larger part of the time. This script starts one subprocess per
measured call; the child builds the data untimed (ShareGPT prompt lengths,
random int32 ids, an in-memory ``datasets.Dataset``, as in
``bench_pack_dataset.py``), then times the packing call (first call), and runs
it once more in the same process (second call) for comparison. Reported per
packer: rows, gap to the L2 bound, output bytes, first-call wall, user and
kernel CPU, input examples per second, and the second call's wall.

Packers: prepack ``pack_dataset`` with the lean schema (the default), the lean
schema carrying one more list column (``completion_mask``, int8, one value per
token, as a chat dataset's mask), and the full schema, and TRL's ``pack_dataset`` (its default ``map`` batch of 1000,
and ``map_kwargs={"batch_size": None}``, one plan over the whole dataset).
``--disk`` adds the lean schema on a dataset loaded from disk
(``load_from_disk``), where ``map`` writes its cache file, and the same call
again in another fresh process, which loads that cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from prepack.bench import sample_lengths

GOAL_ROWS_PER_S = 500_000
PACKERS = {
    "lean": "prepack `pack_dataset` (lean schema, default)",
    "lean_mask": "prepack `pack_dataset` (lean), `input_ids` + an int8 `completion_mask` list column",
    "full": "prepack `pack_dataset(schema=\"full\")`",
    "trl": "TRL `pack_dataset(strategy=\"bfd\")` (map batch 1000)",
    "trl_whole": "TRL `pack_dataset`, `map_kwargs={\"batch_size\": None}`",
    "lean_disk": "prepack `pack_dataset` (lean), dataset from `load_from_disk`, cache written",
    "lean_disk_cached": "the same call again, new process: `map` cache hit",
}


def build_dataset(rows: int, capacity: int, seed: int = 0, mask: bool = False):
    """(lengths (N,), an in-memory Dataset), no Python objects per example.

    The Dataset has an int32 ``input_ids`` list column and, with ``mask``, an int8
    ``completion_mask`` list column with the same offsets (random 0/1 values).
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    lengths = sample_lengths(rows, max_len=capacity, seed=seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.random.default_rng(seed).integers(0, 100_352, int(offsets[-1]), dtype=np.int32)
    columns = {"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}
    if mask:
        bits = np.random.default_rng(seed + 1).integers(0, 2, len(values), dtype=np.int8)
        columns["completion_mask"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(bits))
    table = pa.table(columns)
    return lengths, datasets.Dataset(InMemoryTable(table), fingerprint=f"cold-{rows}-{seed}-{int(mask)}")


def call(name: str, ds, capacity: int):
    if name.startswith("trl"):
        from trl import pack_dataset as trl_pack

        kwargs = {"map_kwargs": {"batch_size": None}} if name == "trl_whole" else {}
        return lambda: trl_pack(ds, seq_length=capacity, strategy="bfd", **kwargs)
    from prepack import pack_dataset

    schema = "full" if name == "full" else "lean"
    return lambda: pack_dataset(ds, capacity, schema=schema)


def child(args) -> None:
    """Build the data, time one packing call (and a second one), print a JSON line."""
    import datasets

    datasets.disable_progress_bars()
    lengths, ds = build_dataset(args.rows, args.capacity, mask=args.child == "lean_mask")
    if args.child.startswith("lean_disk"):
        ds = datasets.load_from_disk(args.disk_dir)
    fn = call(args.child, ds, args.capacity)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    nbytes = out.data.nbytes
    seq = out.with_format("arrow")[:].column("seq_lengths")
    import pyarrow.compute as pc

    n_seq = int(pc.sum(pc.list_value_length(seq)).as_py())
    rows = out.num_rows
    del out
    second = None
    if not args.child.startswith("lean_disk"):
        t = time.perf_counter()
        fn()
        second = time.perf_counter() - t
    print(json.dumps({
        "wall": wall, "user": r1.ru_utime - r0.ru_utime, "kernel": r1.ru_stime - r0.ru_stime,
        "faults": r1.ru_minflt - r0.ru_minflt, "bytes": nbytes, "rows": rows, "sequences": n_seq, "second": second,
    }))


def run_child(name: str, args, disk_dir: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--rows", str(args.rows),
           "--capacity", str(args.capacity)]
    if disk_dir:
        cmd += ["--disk-dir", disk_dir]
    # the child imports the same prepack as this process (a checkout run with PYTHONPATH=., or the installed one)
    import prepack

    root = os.path.dirname(os.path.dirname(os.path.abspath(prepack.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--packers", default="lean,lean_mask,full,trl,trl_whole")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per packer, interleaved; the median is shown")
    ap.add_argument("--disk", action="store_true", help="add the load_from_disk runs (cache written, then hit)")
    ap.add_argument("--child", choices=PACKERS, help=argparse.SUPPRESS)
    ap.add_argument("--disk-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import datasets
    import trl

    from prepack.planner.bins import lower_bound_l2

    lengths, ds = build_dataset(args.rows, args.capacity)
    l2 = lower_bound_l2(lengths, args.capacity)
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with other jobs; python "
          f"{platform.python_version()}, numpy {np.__version__}, datasets {datasets.__version__}, TRL {trl.__version__}")
    print(f"data: {args.rows:,} examples, {int(lengths.sum()):,} tokens (int32), ShareGPT prompt lengths cut at "
          f"{args.capacity} (mean {lengths.mean():.0f}); capacity {args.capacity}; L2 bound {l2:,} rows")
    print("each row: one packing call in a fresh process (first call), then the same call again in that process; "
          f"median of {args.repeat} interleaved run(s)\n")
    print("| packer | rows | over L2 | output | first call | examples/s | user CPU | kernel CPU | minor faults | second call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = args.packers.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.disk:
            datasets.disable_progress_bars()
            names += ["lean_disk", "lean_disk_cached"]
        runs = {name: [] for name in names}
        for k in range(args.repeat):  # interleaved, so a noisy spell hits every packer alike
            if args.disk:  # a fresh copy each time, so "cache written" writes it and "cache hit" loads it
                disk_dir = os.path.join(tmp, f"source{k}")
                ds.save_to_disk(disk_dir)
            for name in names:
                r = run_child(name, args, disk_dir if name.startswith("lean_disk") else None)
                assert r["sequences"] == args.rows, (name, r)
                runs[name].append(r)
        for name in names:
            # the run with the median first-call wall (the upper median for an even count)
            r = results[name] = sorted(runs[name], key=lambda r: r["wall"])[len(runs[name]) // 2]
            second = "-" if r["second"] is None else f"{r['second']:.2f} s"
            print(f"| {PACKERS[name]} | {r['rows']:,} | {r['rows'] / l2 - 1:.3%} | {r['bytes'] / 2**20:,.0f} MiB "
                  f"| {r['wall']:.2f} s | {args.rows / r['wall']:,.0f} | {r['user']:.2f} s | {r['kernel']:.2f} s "
                  f"| {r['faults']:,} | {second} |", flush=True)
    print()
    for name in ("lean", "lean_mask"):
        if name in results:
            rate = args.rows / results[name]["wall"]
            print(f"goal >= {GOAL_ROWS_PER_S:,} examples/s on the first call, {PACKERS[name]}: "
                  f"{'met' if rate >= GOAL_ROWS_PER_S else 'NOT met'} ({rate:,.0f}/s)")
    if "lean" in results:
        for other in ("trl", "trl_whole"):
            if other in results:
                print(f"- lean vs {PACKERS[other]}: {results[other]['wall'] / results['lean']['wall']:.1f}x faster first call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
