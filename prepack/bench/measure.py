"""Timing of one method call (with its memory meter), the agreement check, and the loops over methods and batch sizes.

Time is wall clock around the call (CUDA synchronised), median over ``repeat``
calls. Methods run interleaved round-robin within each repeat, so slow drift of
a shared machine hits every method alike.

Memory is measured by :class:`~prepack.bench.memory.MemoryMeter`; its module
says what the numbers count.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .memory import MB, MemoryMeter
from .methods import (
    DEFAULT_METHODS,
    METRICS,
    SORTED_MICRO_BATCH,
    Call,
    check_method,
    computed_tokens,
    method_fn,
    model_device,
    supports,
)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # the sweep of --plot


class BenchMismatch(RuntimeError):
    """Two methods disagree on a request's next token: timing them against each other would be meaningless."""


def time_call(fn: Callable, device: torch.device) -> tuple[float, object]:
    """Run ``fn()`` once under ``torch.inference_mode``: (seconds, its result).

    No memory meter runs here: its sampling thread and the pages it hands back to
    the OS before a call would be timed too (on a VM, re-faulting them costs more
    than a small prefill). :func:`measure_memory` makes a separate call for that.
    """
    device = torch.device(device)
    with torch.inference_mode():
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
    return dt, result


def measure_memory(fn: Callable, device: torch.device) -> MemoryMeter:
    """Run ``fn()`` once, untimed, under a :class:`~prepack.bench.memory.MemoryMeter`."""
    with torch.inference_mode(), MemoryMeter(torch.device(device)) as mem:
        fn()
    return mem


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, repeat: int = 3, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of ``repeat`` timed calls of every function, after ``warmup`` untimed calls of each.

    The calls are interleaved round-robin, the order rotated by one per round, as
    :func:`run_bench` does, so that drift of a shared machine hits every function alike.
    Take the median of each list.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            dt, result = time_call(fns[name], device)
            del result
            if r >= warmup:
                times[name].append(dt)
    return times


def check_agreement(first_tokens: dict[str, torch.Tensor], metric: str) -> None:
    """Raise :class:`BenchMismatch` naming the request and the methods if any two predict different next tokens."""
    names = list(first_tokens)
    ref = names[0]
    a = first_tokens[ref].cpu()
    for name in names[1:]:
        b = first_tokens[name].cpu()
        bad = torch.nonzero(a != b).reshape(-1)
        if len(bad):
            i = int(bad[0])
            raise BenchMismatch(
                f"request {i}: {name} predicts next token {int(b[i])} but {ref} predicts {int(a[i])} "
                f"({metric}; {len(bad)} of {len(a)} requests differ); refusing to time methods that disagree"
            )


def run_bench(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    metrics: Sequence[str] = ("prefill",),
    methods: Sequence[str] = DEFAULT_METHODS,
    repeat: int = 3,
    warmup: int = 1,
    new_tokens: int = 32,
    micro_batch: int = SORTED_MICRO_BATCH,
    progress: Callable[[str, bool], None] | None = None,
) -> list[dict]:
    """Time every method on ``prompts`` for every metric; one result row per (metric, method).

    Args:
        model: a transformers causal LM (see :func:`prepack.bench.build_model`).
        prompts: N prompts, token-id lists, all non-empty.
        metrics: any of ``"prefill"`` (KV caches + last logits), ``"ttft"``
            (prefill + one decode step) and ``"generate"`` (``new_tokens`` tokens).
        methods: names from :mod:`prepack.bench.methods` (``padded``, ``sorted``,
            ``prepack``, ``prepack:<backend>``, ...); a method that cannot run a
            metric is left out of that metric's rows.
        repeat: timed calls per method; each repeat runs every method once,
            in an order rotated by one per repeat.
        warmup: untimed rounds first. The first round's next tokens are checked
            for agreement; with ``warmup=0`` the first timed round's are.
        progress: ``progress(label, done)`` is called as every method call starts
            (``done=False``, with the label of the call about to run, e.g.
            ``"batch 4 prefill padded timed 2/3"``) and as it ends (``done=True``, the same
            label): a tqdm bar names the running call and counts the finished ones.
            :func:`count_calls` says how many calls there are, memory ones included.

    Returns:
        Dicts with ``metric, method, backend, batch_size, real_tokens, computed_tokens,
        pad_ratio, shared_tokens, times_s, median_s, min_s, max_s, speedup, speedup_vs_sdpa_masked,
        tokens_per_s, mem_peak_mb, mem_growth_mb, mem_meter, same_tokens`` (fraction of
        requests whose whole output matches the first method's; 1.0 for prefill). ``shared_tokens``:
        prompt tokens prepack's prefill did not run because a shared prefix ran once
        (``computed_tokens`` is below ``real_tokens`` then).
        Memory comes from one more call of each method after the timed rounds, under
        the memory meter (never during a timed call). A method other than ``padded``
        that raises gets a row with ``error`` instead.

    Raises:
        BenchMismatch: two methods predict a different next token for a request.
    """
    _check_bench_args(prompts, metrics, methods, repeat, warmup)
    prompts = tuple(list(p) for p in prompts)
    device = model_device(model)
    pad_id = model.generation_config.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    lengths = [len(p) for p in prompts]
    rows = []
    for metric in metrics:
        names = [m for m in methods if supports(m, metric)]
        call = Call(prompts, metric, new_tokens, pad_id, micro_batch)
        run = _method_runner(model, call, device, progress)
        rounds = _run_rounds(run, names, metric, repeat=repeat, warmup=warmup)
        mems = {m: run(m, "memory", measure_memory) for m in names if m not in rounds.failed}
        rows += _metric_rows(
            call, names, rounds, mems, lengths=lengths, micro_batch=micro_batch, device=device, repeat=repeat, warmup=warmup
        )
        _add_speedups(rows, metric, len(prompts))
    return rows


def _check_bench_args(
    prompts: Sequence[Sequence[int]], metrics: Sequence[str], methods: Sequence[str], repeat: int, warmup: int
) -> None:
    """Refuse :func:`run_bench`'s arguments before any call: an unknown method or metric, ``repeat < 1``,
    ``warmup < 0``, or an empty request (prompts: N token-id lists), naming the first bad one."""
    for m in methods:
        check_method(m)
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"request {i} is empty; drop empty prompts before benchmarking "
                "(prepack.bench.prompts.select_prompts does)"
            )


_Runner = Callable[[str, str, Callable], object]


def _method_runner(model, call: Call, device: torch.device, progress: Callable[[str, bool], None] | None) -> _Runner:
    """``run(m, label, measure)``: ``measure`` (:func:`time_call` or :func:`measure_memory`) of one call of
    method ``m`` on ``call``'s N prompts, reported to ``progress`` as ``"batch N <metric> <m> <label>"``
    when it starts (``False``) and when it ends (``True``, even if it raised)."""

    def run(m: str, label: str, measure: Callable):
        what = f"batch {len(call.prompts)} {call.metric} {m} {label}"
        if progress:
            progress(what, False)
        try:
            return measure(lambda: method_fn(m)(model, call), device)
        finally:
            if progress:
                progress(what, True)

    return run


@dataclass
class _Rounds:
    """What the warm-up and timed rounds of one metric gave, keyed by method name.

    Attributes:
        times: ``repeat`` seconds per method, one per timed round it finished.
        outputs: the first round's output, (N, k) tokens or its per-micro-batch pieces, for ``generate``;
            None for the other metrics.
        backends: the attention backend the first round's call reports.
        ran: prompt tokens the first round's call ran, where the method reports them
            (shared prefixes run once); absent otherwise.
        failed: ``"<ErrorType>: <first line of the message>"`` of the call that raised; such a method
            makes no further call.
    """

    times: dict[str, list[float]]
    outputs: dict[str, object] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    ran: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _run_rounds(run: _Runner, names: list[str], metric: str, *, repeat: int, warmup: int) -> _Rounds:
    """``warmup`` untimed then ``repeat`` timed rounds of every method in ``names``, round-robin with the
    order rotated by one per round; the first round's next tokens (N,) must agree (:func:`check_agreement`).

    A method other than ``padded`` that raises is recorded in ``failed`` and skipped from then on;
    ``padded`` raising is fatal (it is the reference every speed-up is taken against).
    """
    rounds = _Rounds(times={m: [] for m in names})
    firsts: dict[str, torch.Tensor] = {}
    for r in range(warmup + repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for m in order:
            if m in rounds.failed:
                continue
            label = "warmup" if r < warmup else f"timed {r - warmup + 1}/{repeat}"
            try:
                dt, outcome = run(m, label, time_call)
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                if m == "padded":
                    raise
                rounds.failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                continue
            if r == 0:
                firsts[m] = outcome.first.cpu()
                rounds.outputs[m] = outcome.output if metric == "generate" else None
                rounds.backends[m] = outcome.backend
                if outcome.tokens_run is not None:
                    rounds.ran[m] = outcome.tokens_run
            if r >= warmup:
                rounds.times[m].append(dt)
            del outcome
        if r == 0:
            check_agreement({m: firsts[m] for m in names if m not in rounds.failed}, metric)
    return rounds


def _metric_rows(
    call: Call,
    names: list[str],
    rounds: _Rounds,
    mems: dict[str, MemoryMeter],
    *,
    lengths: list[int],
    micro_batch: int,
    device: torch.device,
    repeat: int,
    warmup: int,
) -> list[dict]:
    """:func:`run_bench`'s rows for one metric (N = ``len(lengths)`` prompts): an ``error`` row per failed
    method, then a timing row per method that ran (no speed-ups yet: :func:`_add_speedups` adds them)."""
    metric = call.metric
    meter = "cuda max_memory_allocated" if device.type == "cuda" else "rss"
    rows = [dict(metric=metric, method=m, batch_size=len(lengths), error=why) for m, why in rounds.failed.items()]
    ref = names[0]
    for m in [m for m in names if m not in rounds.failed]:
        ts = rounds.times[m]
        median = statistics.median(ts)
        generated = len(lengths) * call.max_new_tokens
        computed = rounds.ran.get(m, computed_tokens(m, lengths, micro_batch))
        rows.append(dict(
            metric=metric, method=m, backend=rounds.backends[m], batch_size=len(lengths), real_tokens=sum(lengths),
            computed_tokens=computed, pad_ratio=computed / sum(lengths), shared_tokens=max(sum(lengths) - computed, 0),
            times_s=ts, median_s=median, min_s=min(ts), max_s=max(ts),
            tokens_per_s=(sum(lengths) + (generated if metric == "generate" else 0)) / median,
            mem_peak_mb=mems[m].peak / MB, mem_growth_mb=mems[m].growth / MB,
            mem_meter=meter,
            same_tokens=(
                _same_fraction(rounds.outputs.get(ref), rounds.outputs.get(m)) if metric == "generate" else 1.0
            ),
            repeat=repeat, warmup=warmup, device=str(device), new_tokens=call.max_new_tokens if metric != "prefill" else 0,
        ))
    return rows


def _same_fraction(a, b) -> float:
    """Fraction of requests whose generated tokens match exactly (a, b: (N, k) tensors or lists of 1-D tensors)."""
    if a is None or b is None:
        return float("nan")
    a = _as_rows(a)
    b = _as_rows(b)
    return sum(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b)) / len(a)


def _as_rows(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return list(x)
    if x and isinstance(x[0], tuple):  # sorted: (indices, (n, k) tokens) per micro-batch
        rows: dict[int, torch.Tensor] = {}
        for idx, new in x:
            rows.update({int(i): t for i, t in zip(idx, new)})
        return [rows[i] for i in range(len(rows))]
    return list(x)


def _add_speedups(rows: list[dict], metric: str, batch_size: int) -> None:
    group = [r for r in rows if r["metric"] == metric and r["batch_size"] == batch_size]
    base = {r["method"]: r["median_s"] for r in group if "error" not in r}
    for r in group:
        if "error" in r:
            continue
        r["speedup"] = base["padded"] / r["median_s"] if "padded" in base else float("nan")
        masked = base.get("prepack:sdpa_masked")
        r["speedup_vs_sdpa_masked"] = masked / r["median_s"] if masked is not None else float("nan")


def run_sweep(
    model, prompts: Sequence[Sequence[int]], batch_sizes: Sequence[int], *, progress=None, **kwargs
) -> list[dict]:
    """:func:`run_bench` on the first B prompts for every B in ``batch_sizes`` (nested batches)."""
    return [row for _, rows in iter_sweep(model, prompts, batch_sizes, progress=progress, **kwargs) for row in rows]


def iter_sweep(
    model, prompts: Sequence[Sequence[int]], batch_sizes: Sequence[int], *, progress=None, **kwargs
) -> Iterator[tuple[int, list[dict]]]:
    """Yield ``(B, run_bench rows)`` for every B in ``batch_sizes``, so that a caller keeps the
    batches already done when a later one fails.

    Raises:
        ValueError: before any run, if a batch size is not a positive integer or exceeds the prompts.
    """
    check_batch_sizes(batch_sizes, len(prompts))
    for b in batch_sizes:
        yield b, run_bench(model, prompts[:b], progress=progress, **kwargs)


def check_batch_sizes(batch_sizes: Sequence[int], num_prompts: int) -> None:
    """Raise ValueError naming the first batch size that is not an integer in ``[1, num_prompts]``."""
    if len(batch_sizes) == 0:
        raise ValueError("no batch sizes given")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch size must be an integer >= 1, got {b!r}")
        if b > num_prompts:
            raise ValueError(f"batch size {b} needs {b} prompts but only {num_prompts} were loaded")


def count_calls(batch_sizes, metrics, methods, repeat: int, warmup: int) -> int:
    """How many method calls :func:`run_sweep` makes, for a progress bar: the warm-up and timed
    rounds, and the one memory-measuring call per method (a method that fails makes fewer)."""
    per = sum(len([m for m in methods if supports(m, metric)]) for metric in metrics)
    return len(batch_sizes) * per * (repeat + warmup + 1)
