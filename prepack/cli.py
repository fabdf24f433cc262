"""The ``prepack`` command: ``prepack plan`` compares the planners, ``prepack bench`` times prefill."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .planner import ALGORITHMS, plan


def read_lengths(path: str) -> np.ndarray:
    """One integer per line, or JSONL with a token list (or an object with ``input_ids``) per line."""
    lengths = []
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"{path}:{lineno}: expected an integer or a JSON token list, got {line[:40]!r}") from None
        if isinstance(value, dict):
            value = value.get("input_ids")
        if isinstance(value, list):
            value = len(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SystemExit(f"{path}:{lineno}: expected an integer or a JSON token list, got {line[:40]!r}")
        lengths.append(value)
    return np.asarray(lengths, dtype=np.int64)


def cmd_plan(args) -> int:
    lengths = read_lengths(args.lengths)
    if len(lengths) == 0:
        raise SystemExit(f"{args.lengths}: no lengths found")
    algorithms = args.algorithms.split(",") if args.algorithms else list(ALGORITHMS)
    capacity = args.capacity or int(lengths.max())
    try:
        first = plan(lengths, capacity, algorithm="none")  # validates once, with the request-naming errors
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    l1, l2 = first.lower_bound_l1, first.lower_bound_l2
    print(f"{len(lengths)} requests, {int(lengths.sum())} tokens, capacity {capacity}: L1 bound {l1} rows, L2 bound {l2} rows\n")
    print("| algorithm | rows | efficiency | over L1 | over L2 | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in algorithms:
        if name == "binpacking" and len(lengths) > args.binpacking_limit:
            print(f"| binpacking | skipped: {len(lengths)} items > --binpacking-limit {args.binpacking_limit} (it is quadratic) | | | | |")
            continue
        t = time.perf_counter()
        try:
            p = plan(lengths, capacity, algorithm=name, max_per_row=args.max_per_row)
        except (ValueError, ImportError) as e:
            print(f"| {name} | error: {e} | | | | |")
            continue
        dt = time.perf_counter() - t
        print(
            f"| {name} | {p.num_rows} | {p.efficiency:.2%} | {(p.num_rows - l1) / l1:+.3%} "
            f"| {(p.num_rows - l2) / l2:+.3%} | {dt * 1e3:.1f} ms |"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="compare packing algorithms on a file of lengths")
    p.add_argument("lengths", help="file with one integer per line, or JSONL token lists; '-' for stdin")
    p.add_argument("--capacity", type=int, default=None, help="tokens per row (default: the longest request)")
    p.add_argument("--algorithms", default=None, help=f"comma-separated subset of {','.join(ALGORITHMS)}")
    p.add_argument("--max-per-row", type=int, default=None)
    p.add_argument("--binpacking-limit", type=int, default=30_000, help="skip the quadratic binpacking package above this size")
    p.set_defaults(func=cmd_plan)
    try:
        from .bench import add_bench_parser
    except ImportError:  # the bench needs the [bench] extra; plan does not
        pass
    else:
        add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
