"""Prefill-only jobs as runs of the executor: requests that sample nothing and collect outputs at spans.

``prefill``, ``forward_at``, ``score``, ``score_rolling``, ``embed``, ``classify`` and the lm-eval
backend all come here: :func:`run_jobs` feeds the requests through the same scheduler, KV store and
step as ``generate`` (:mod:`prepack.executor.scheduler`, :mod:`prepack.executor.kvstore`, :mod:`prepack.executor`).
A request is a :class:`Job`: its prompt, and the span ``[start, end)`` of its own positions whose
outputs it wants. Each step's forward computes outputs at the span rows it holds only (the LM head
through ``logits_to_keep``, or the decoder's last hidden state there), and ``reduce`` may shrink
them before the next step runs. So:

* a prompt longer than ``token_budget`` is fed over several steps, each chunk continuing its own
  earlier keys in the store (the one chunking mechanism);
* prompts that start alike share their common prefix as a region of the store, at any depth (a
  few-shot header shared by every request, a context shared by its choices: the one prefix-sharing
  mechanism, :mod:`prepack.executor.regions`). A region ends before the first position any of its
  readers wants outputs at, so every output row is computed in its own request's segment;
* a step whose segments are all whole prompts that nothing continues needs no store at all.

With ``keep_cache`` each step records what the model caches (:func:`prepack.jobs.caches.recording_cache`:
RoPE-applied keys, MLA's latents) and :class:`JobsRun` says where each request's tokens sit in those
records (its regions' pieces, then its own), from which :class:`prepack.PrefillResult` builds caches.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Sequence

import numpy as np
import torch

from . import caches as kvcache
from ..planner import layout
from ..attention.registry import choose
from .engine import default_kv_budget
from ..executor.step import Fed, forward_step, rope_groups
from ..hf.model import OUTPUTS, Output, Reduce, base_model, check_lm_head, default_token_budget, no_values
from ..hf.registration import attention_needs, cache_kwarg, model_device, switched
from ..executor.kvstore import KVStore
from ..planner.bins import check_capacity, plan
from ..executor.regions import MIN_SHARED_TOKENS, common_prefix_length, sharing_refusal
from ..hf.rope import rope_dependence
from ..executor.scheduler import Scheduler
from ..hf.support import UnsupportedModelError, kv_share_sources, revisiting_attention
from ..mixers import continuation_refusal
from ..mixers.states import MixerCapture, SegmentCaches, keyless_layers
from ..mixers.states import layer_indices as mixer_layer_indices
from ..hf.wrapped import check_mode, runner, unwrap

READ_AHEAD = 128  # waiting requests a new shared region is chosen for (requests are ordered so that sharers are adjacent)


class Job:
    """A prefill-only request: its prompt, where it wants outputs, and what it has still to feed.

    Attributes:
        index: its number in the caller's list. span: ``(start, end)`` of its own positions to return outputs at.
        pending: what it has not fed yet (after its prefix regions). prefix: the deepest region it reads, or
            None; offset: that region's end. pieces: ``(step, start, size)`` where its fed tokens sit in the
            steps' records, in token order.
    """

    __slots__ = ("index", "prompt", "span", "splittable", "pending", "prefix", "offset", "pieces", "out_start")
    tokens = ()  # it never decodes

    def __init__(self, index: int, prompt: np.ndarray, span: tuple[int, int], out_start: int, splittable: bool):
        self.index, self.prompt, self.span, self.out_start = index, prompt, span, out_start
        self.splittable = splittable
        self.pending, self.prefix, self.offset = prompt, None, 0
        self.pieces: list[tuple[int, int, int]] = []

    @property
    def key(self) -> int:
        return self.index

    @property
    def most(self) -> int:
        return len(self.prompt)

    @property
    def shareable(self) -> np.ndarray:
        """The prefix it may read from a shared region: up to the first position it wants outputs at, which may be
        the region's last token (its output is then the region's, given to each reader)."""
        s, e = self.span
        return self.prompt[: s + 1] if e > s else self.prompt


class JobsRun(NamedTuple):
    """What :func:`run_jobs` returns.

    Attributes:
        backend: the kernel that ran (``"auto"`` resolved).
        values: (K, ...) outputs at the spans (after ``reduce``), request after request; None without spans.
        chunks: per step, per layer (keys, values) what the model cached, each (B, H_kv, L, D); [] without ``keep_cache``.
        parts: where each request's tokens sit in ``chunks`` (its regions' pieces, then its own).
        steps: forwards run. tokens_run: tokens that went through the model.
        shared_tokens: prompt tokens not run because a region held them for several requests.
        grids: per step, its (B, L) token grid (1 row of T tokens for a varlen stream).
        layer_copies: cache layers the model appended in its forwards -> the layer each copies
            (:func:`prepack.jobs.caches.appended_layers`; Dory's per-loop layers), {} for most models.
    """

    backend: str
    values: torch.Tensor | None
    chunks: list
    parts: layout.Parts
    steps: int
    tokens_run: int
    shared_tokens: int
    grids: list
    layer_copies: dict = {}


def run_jobs(
    model,
    tokens: Sequence[np.ndarray],
    *,
    spans: np.ndarray | None = None,
    output: Output = "logits",
    reduce: Reduce | None = None,
    keep_cache: bool = False,
    backend="auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    share_prefixes: bool = True,
    vision=None,
    names: Sequence[int] | None = None,
    lengths: np.ndarray | None = None,
) -> JobsRun:
    """Run checked token arrays (zero-length ones allowed: they take no slot) and collect outputs at ``spans``.

    Args:
        tokens: N int64 arrays (:func:`prepack.hf.inputs.check_prompts`). spans: (N, 2) int64 ``[start, end)`` per
            request, or None (no outputs).
        output, reduce: see :func:`prepack.forward_at`. keep_cache: record what the model caches, per step.
        backend: a kernel name or :class:`~prepack.attention.registry.Kernel`. token_budget: most tokens per forward (None:
            :func:`~prepack.hf.model.default_token_budget`, raised to the longest request: nothing is chunked).
        capacity: a row kernel's row length (default: the longest request); refused for the others.
        share_prefixes: hold prefixes that requests share once (exact; skipped for models where merging a
            prefix is not, :func:`prepack.executor.regions.sharing_refusal`). vision: the requests' images, or None.
        names: each request's number in the caller's list, for errors. lengths: (N,) ``len`` of each, if known.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    if not isinstance(share_prefixes, bool):
        raise TypeError(f"share_prefixes must be True or False, got {share_prefixes!r}")
    check_mode(model)
    lengths = layout.lengths_of(tokens) if lengths is None else lengths
    names = np.arange(len(lengths)) if names is None else np.asarray(names)
    device = model_device(model)
    kernel = choose(backend, device=device, dtype=next(model.parameters()).dtype, needs=attention_needs(model))
    if spans is not None and output == "logits":
        check_lm_head(model)
    real = np.flatnonzero(lengths)
    longest = int(lengths.max()) if len(real) else 1
    explicit = capacity is not None
    budget, capacity = _budgets(model, kernel, token_budget, capacity, longest, vision)
    rope = rope_dependence(model)
    stateful = continuation_refusal(model)  # a token mixer outside attention: each request runs whole, in one step
    share = share_prefixes and not kernel.rows and vision is None and sharing_refusal(model, rope) is None
    out_start = layout.starts(spans[:, 1] - spans[:, 0]) if spans is not None else np.zeros(len(lengths), np.int64)
    if explicit:  # every request must fit one row
        layout.check_fits(lengths[real], capacity, ids=names[real], hint="raise capacity")
    jobs = []
    for i in real.tolist():
        span = (0, 0) if spans is None else tuple(int(x) for x in spans[i])
        whole = kernel.rows or vision is not None or stateful is not None or not _rope_splittable(rope, int(lengths[i]))
        if whole and lengths[i] > budget:
            raise _whole_refusal(int(names[i]), int(lengths[i]), budget, kernel, rope, model, stateful)
        # a prompt that fits a forward runs whole (its step ends before it instead): only a longer one is cut
        jobs.append(Job(i, tokens[i], span, int(out_start[i]), splittable=not whole and lengths[i] > budget))
    ordered, share = _order(jobs, budget, share)
    waiting = deque(ordered)
    plain = sharing_refusal(model, rope) is None  # attention that can be merged from parts exactly
    store = KVStore(device, split_chunks=plain and device.type == "cpu", slides=(), reads=kv_share_sources(unwrap(model).config),
                    revisits=revisiting_attention(unwrap(model)))
    sched = Scheduler(store, token_budget=budget, kv_budget=max(default_kv_budget(model), longest),
                      max_batch=None, admit_check=lambda r: None, chunk=not kernel.rows, share=share,
                      stats=_NoStats(), read_ahead=READ_AHEAD)
    run = _Jobs(model, kernel, store, sched, rope, output, reduce, keep_cache, vision, capacity, wants=spans is not None)
    with switched(model), torch.no_grad():
        while run.step(waiting):
            pass
    values = None
    if spans is not None:
        values = run.values() if run.outputs else no_values(model, output, reduce, device)
    parts = layout.Parts.join([(j.index, *p) for j in jobs for p in _chain(j)], len(lengths))
    tokens_run = sum(n for _, _, n in (p for j in jobs for p in j.pieces)) + run.region_tokens
    return JobsRun(kernel.name, values, run.chunks, parts, run.steps, tokens_run, int(lengths.sum()) - tokens_run, run.grids,
                   run.layer_copies)


class _NoStats:
    """The scheduler's counters, unread by prefill-only runs."""

    prefix_regions = 0
    shared_prefix_tokens = 0


def _budgets(model, kernel, token_budget, capacity, longest: int, vision) -> tuple[int, int | None]:
    """(tokens per forward, a row kernel's row length), checked; errors name the limit."""
    if token_budget is not None:
        token_budget = check_capacity(token_budget, "token_budget")
    if capacity is not None:
        capacity = check_capacity(capacity)
        if not kernel.rows:
            raise ValueError(
                f"capacity applies to backend='sdpa_masked', which packs rows of capacity tokens; backend {kernel.name!r} "
                "runs one varlen stream per forward: bound it with token_budget instead"
            )
    if vision is not None and kernel.rows:
        raise ValueError(f"prompts with images run on a varlen backend (got backend {kernel.name!r}); use backend='auto'")
    if not kernel.rows:
        return (token_budget if token_budget is not None else max(default_token_budget(model), longest)), None
    budget = token_budget if token_budget is not None else max(default_token_budget(model), capacity or longest)
    if capacity is not None and capacity > budget:
        raise ValueError(f"capacity {capacity} exceeds token_budget {budget}: one row must fit in one forward")
    # without a capacity, rows are as long as the longest request that fits a forward (a longer one is refused by name)
    return budget, capacity or min(longest, budget)


def _rope_splittable(rope, n: int) -> bool:
    """Whether a request of ``n`` tokens may be fed in pieces: every piece's forward gives it its whole frequencies."""
    return rope is None or all(rope.key(e) == rope.key(n) for e in range(1, n))


def _whole_refusal(name: int, n: int, budget: int, kernel, rope, model, stateful: str | None) -> Exception:
    """The error for a request that must run whole in one forward and is longer than ``token_budget``."""
    head = f"request {name} has {n} tokens but token_budget is {budget}, and "
    model_name = type(unwrap(model)).__name__
    if kernel.rows:
        return ValueError(head + f"backend {kernel.name!r} lays requests out in rows, so it cannot prefill a prompt in "
                          "chunks (use a varlen backend such as 'sdpa_varlen', or raise token_budget)")
    if stateful is not None:
        return UnsupportedModelError(head + f"{model_name} cannot prefill a prompt in chunks exactly: {stateful} "
                                     "(raise token_budget to its length)")
    if rope is not None:
        return ValueError(head + f"{model_name}'s {rope.describe()} gives a chunk of it other rotary frequencies than the "
                          "whole request: prepack cannot prefill it in chunks exactly (raise token_budget to its length)")
    return ValueError(head + "a prompt with images runs whole, in one forward (raise token_budget)")


def _order(jobs: list, budget: int, share: bool) -> tuple[list, bool]:
    """The order requests are admitted in, and whether any can share a region: sharers adjacent (sorted by tokens)
    when some prompts share a prefix worth a region, else the planner's best-fit order, so that each step is about
    one planned forward."""
    if share:
        # a byte-wise sort keeps every group of prompts with a common token prefix contiguous, as a token-wise one would
        by_tokens = sorted(jobs, key=lambda j: j.prompt.tobytes())
        for a, b in zip(by_tokens, by_tokens[1:]):
            n = common_prefix_length(a.shareable, b.shareable)
            if n >= MIN_SHARED_TOKENS or 0 < n == min(len(a.shareable), len(b.shareable)):
                return by_tokens, True
    if not jobs:
        return [], False
    p = plan(np.array([len(j.prompt) for j in jobs], np.int64), max(budget, max(len(j.prompt) for j in jobs)))
    return [jobs[i] for i in p.order], False


class _Jobs:
    """One prefill-only run: the scheduler and store, the model call, and what the steps returned; :meth:`step` runs one."""

    def __init__(self, model, kernel, store: KVStore, sched: Scheduler, rope, output: str, reduce, keep_cache: bool,
                 vision, capacity: int | None, wants: bool):
        self.model, self.module, self.base = model, runner(model), base_model(model)
        self.kernel, self.store, self.sched, self.rope, self.capacity = kernel, store, sched, rope, capacity
        self.output, self.reduce, self.keep_cache, self.vision = output, reduce, keep_cache, vision
        self.name = type(unwrap(model)).__name__
        self.mixer_layers = mixer_layer_indices(model)
        # layers that write no keys: a mixer's (its states are in the request's own cache) and an MLP-only one
        self.keyless = keyless_layers(model)
        self.chunks: list = []  # per forward, per layer (keys, values) what the model cached (keep_cache)
        self.layer_copies: dict = {}  # cache layers the model appends in its forward -> the layer each copies
        self.outputs: list = []  # per forward, (values, rows in the request-order result)
        self.grids: list = []  # per forward, its (B, L) token grid
        self.steps = self.region_tokens = 0
        self.wants = wants  # whether any job wants outputs

    def step(self, waiting: deque) -> bool:
        """Schedule, run the step's forward(s), finish the jobs that fed all they had; False once nothing is left."""
        feeds, units = self.sched.next_step(waiting)
        if not feeds:
            if self.sched.running or waiting:
                raise RuntimeError("prepack's executor planned an empty step with requests left (a scheduling bug)")
            return False
        for group in rope_groups(feeds, units, self.rope, self.name):
            self._forward(group, units)
        self.sched.fed(feeds, units)
        done = [units[k] for k in feeds if isinstance(units[k], Job) and not len(units[k].pending)]
        done += self.sched.ready(lambda r: not len(r.prefix.pending))  # whole prompt held by a complete region
        self._region_outputs(done)
        for job in done:
            self.sched.finish(job)
        return True

    def _region_outputs(self, done: list) -> None:
        """Give each finished job whose first output position is its region's last token that region's output there."""
        takers = [j for j in done if j.prefix is not None and j.span[1] > j.span[0] and j.span[0] == j.offset - 1]
        if takers:
            values = torch.stack([j.prefix.last_logits for j in takers])
            rows = torch.tensor([j.out_start for j in takers], dtype=torch.long, device=values.device)
            self.outputs.append((values if self.reduce is None else self.reduce(values, rows), rows))

    def _forward(self, feeds: dict, units: dict) -> None:
        direct = self.kernel.rows or all(
            isinstance(units[k], Job) and units[k].prefix is None and n == len(units[k].prompt) for k, n in feeds.items()
        )
        records: dict = {}
        cache = states = None
        if self.keep_cache:
            config = unwrap(self.model).config
            cache = {"kwarg": cache_kwarg(self.model), "cache": kvcache.recording_cache(config, records)}
            if self.mixer_layers:  # each request's conv / recurrent states, in a cache of the model's own class
                states = SegmentCaches(config)
        where: list = []
        fed, values = forward_step(
            self.module, self.kernel, None if direct else self.store, feeds, units, lambda f: self._span_rows(f, where),
            output=self.output, base=self.base, cache=cache, vision=self.vision, capacity=self.capacity, states=states,
        )
        self.grids.append(fed.grid)
        if self.keep_cache:
            chunk = _recorded(records, len(cache["cache"].layers), self.name, self.keyless)
            self.layer_copies = kvcache.appended_layers(cache["cache"])
            if states is not None:  # kept beside the keys: per segment of this forward, its request's mixer states
                chunk = MixerCapture(chunk, {int(fed.start[j]): c for j, c in states.caches.items()})
            self.chunks.append(chunk)
        for u, n, start in zip(fed.units, fed.q.tolist(), fed.start.tolist()):
            u.pieces.append((self.steps, start, n))
            if not isinstance(u, Job):
                self.region_tokens += n
        self.steps += 1
        own, regions = where
        for i, u in regions:  # a region keeps its last token's output for the readers whose first output it is
            u.last_logits = values[i].clone()  # a copy: a view would keep the whole step's outputs alive
        if len(own):
            if regions:
                values = values[: len(own)]
            rows = torch.from_numpy(own).to(values.device)
            self.outputs.append((values if self.reduce is None else self.reduce(values, rows), rows))

    def _span_rows(self, fed: Fed, where: list) -> np.ndarray:
        """The grid rows of the forward that hold outputs a job asked for, then the last rows of the regions that
        feed their last tokens; ``where`` gets the jobs' rows in the result and (index, region) of the others."""
        at, dst, last = [], [], []
        for u, n, cached, start in zip(fed.units, fed.q.tolist(), fed.cached.tolist(), fed.start.tolist()):
            if not isinstance(u, Job):
                if n == len(u.pending) and self.wants:  # at most a region's last token is a position its readers want
                    last.append((start + n - 1, u))
                continue
            s, e = u.span
            first = u.offset + cached  # the request position of the first token fed
            lo, hi = max(s, first), min(e, first + n)
            if hi > lo:
                at.append(np.arange(start + lo - first, start + hi - first))
                dst.append(np.arange(u.out_start + lo - s, u.out_start + hi - s))
        own = np.concatenate(at) if at else np.zeros(0, np.int64)
        where += [np.concatenate(dst) if dst else np.zeros(0, np.int64), [(len(own) + k, u) for k, (_, u) in enumerate(last)]]
        return np.concatenate([own, np.array([r for r, _ in last], np.int64)])

    def values(self) -> torch.Tensor:
        """(K, X) every forward's outputs, in request order."""
        packed = torch.cat([v for v, _ in self.outputs])
        rows = torch.cat([r for _, r in self.outputs])
        return packed.new_empty(packed.shape).index_copy_(0, rows, packed)


def _recorded(records: dict, layers: int, name: str, keyless=frozenset()) -> list:
    """Per layer (keys, values) the model wrote to its cache in one forward (None where it wrote none); refuses a
    layer that wrote none unless it is ``keyless`` (a token mixer's, an MLP-only one's)."""
    missing = sorted(set(range(layers)) - set(records) - set(keyless))
    if missing:
        raise UnsupportedModelError(
            f"{name} wrote no keys and values to its cache for layer(s) {missing} of {layers}; prepack builds each "
            "request's cache from what the model caches"
        )
    return [records.get(i) for i in range(layers)]


def _chain(job: Job) -> list[tuple[int, int, int]]:
    """The job's pieces in token order: its regions' (root first), then its own."""
    regions, r = [], job.prefix
    while r is not None:
        regions.append(r)
        r = r.prefix
    return [p for r in reversed(regions) for p in r.pieces] + job.pieces
