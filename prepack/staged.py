"""Requests run as several segments: a shared prefix once, a long prompt in chunks, each exact.

:func:`run_staged` is :func:`~prepack.forward.run_packed` for requests that need not run whole:

* **Shared prefixes.** Requests that start with the same tokens (a system prompt, few-shot
  examples, tool descriptions) share them: :func:`prepack.prefixes.plan_prefixes` picks which
  prefixes to run once. Each prefix runs first, keeping its keys and values as attention sees
  them; then each request runs only its suffix, a segment whose queries continue the prefix's
  keys (a :class:`~prepack.forward.Prefix`) and whose position ids start at the prefix length.
* **Chunks.** A sequence (a prefix or a suffix) longer than ``token_budget`` runs in pieces of
  at most ``token_budget`` tokens, each continuing the keys of the pieces before it, so that a
  forward never holds more than the budget's activations.

The pieces run in stages: the prefixes' first pieces, their second pieces, ..., then the
suffixes' first pieces, and so on; each stage is one :func:`run_packed` call, which packs its
pieces into forwards. A request's keys and values stay where the forwards left them and are
described by a :class:`~prepack.layout.Parts` (its prefix's pieces, then its own).

Exact as each request alone: attention over [earlier keys, new keys] with the causal mask aligned
to the bottom right is attention over the whole request, for full, sliding-window and chunked
layers alike. What is cached (``kv="cache"``) is recorded per piece, so models whose cache is not
what attention sees (MLA's compressed latents) get their own cache too. Not staged (run whole):
row backends (``sdpa_masked``), which cannot continue keys; and no prefix is shared for a model
whose RoPE frequencies depend on the sequence length (:mod:`prepack.rope`), whose prefix keys
would differ from the request's; such a model's long prompt is chunked only where every
chunk's length gives the whole prompt's frequencies, and refused otherwise.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from . import layout
from .backends import choose
from .forward import Output, Prefix, Reduce, no_values, run_packed
from .hf import attention_needs, model_device
from .packing import PackedBatch
from .planner import check_capacity
from .prefixes import PrefixPlan, no_sharing, plan_prefixes
from .mixers import continuation_refusal
from .rope import rope_dependence
from .support import UnsupportedModelError


class StagedRun(NamedTuple):
    """What :func:`run_staged` returns.

    Attributes:
        backend: the attention backend that ran.
        batch: the :class:`~prepack.packing.PackedBatch` of the last stage (the only one when
            nothing was shared or chunked).
        chunks: per forward, per layer (keys, values) what the model caches, each (1, H_kv, S, D)
            (or (B, H_kv, L, D) for a row backend); [] per forward unless ``kv="cache"``.
        parts: where each request's tokens sit in ``chunks`` (its shared prefix's pieces, then its own).
        values: (K, ...) outputs at the asked positions (after ``reduce``), request after request; None without spans.
        tokens_run: tokens that went through the model.
        shared_tokens: tokens not run because a shared prefix ran once for several requests.
    """

    backend: str
    batch: PackedBatch
    chunks: list
    parts: layout.Parts
    values: torch.Tensor | None
    tokens_run: int
    shared_tokens: int


class _Seq(NamedTuple):
    """A sequence to run in pieces: a shared prefix (``owner`` -1) or request ``owner``'s own tokens."""

    tokens: np.ndarray
    parent: int  # the shared prefix (index into the prefix sequences) it continues, or -1
    offset: int  # its first token's position in the request (the parent's length)
    span: tuple[int, int]  # outputs wanted, in its own coordinates


def run_staged(
    model,
    tokens: Sequence[np.ndarray],
    *,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    spans: np.ndarray | None = None,
    output: Output = "logits",
    reduce: Reduce | None = None,
    kv: str | None = None,
    lengths: np.ndarray | None = None,
    share_prefixes: bool = True,
    vision=None,
    names: Sequence[int] | None = None,
) -> StagedRun:
    """:func:`~prepack.forward.run_packed` with shared prefixes run once and long sequences run in chunks.

    Args:
        tokens, spans, output, reduce, backend, capacity, lengths: as in :func:`run_packed`. Outputs
            that fall inside a shared prefix are computed once and copied to each request; with
            ``reduce`` no output position is shared (``reduce`` sees each request's rows).
        token_budget: at most this many new tokens per forward; a longer sequence runs in chunks
            (None: :func:`~prepack.forward.default_token_budget`, raised to the longest request: no chunks).
        kv: None or ``"cache"`` (keep what the model caches, for per-request caches).
        share_prefixes: run shared prefixes once (False: every request runs whole).
        vision: the requests' images (:class:`prepack.vision.VisionPrompts`), or None. A request with
            images runs whole, in one forward (its image features and mRoPE rows are laid out for the
            whole prompt): nothing is shared, and one longer than ``token_budget`` is refused.
        names: the number of each request in the caller's own list, for errors (None: its position here).
    """
    if kv not in (None, "cache"):
        raise ValueError(f"kv must be None or 'cache', got {kv!r}")
    if not isinstance(share_prefixes, bool):
        raise TypeError(f"share_prefixes must be True or False, got {share_prefixes!r}")
    if token_budget is not None:
        token_budget = check_capacity(token_budget, "token_budget")
    lengths = layout.lengths_of(tokens) if lengths is None else lengths
    kernel = choose(backend, device=model_device(model), dtype=next(model.parameters()).dtype, needs=attention_needs(model))
    long = token_budget is not None and len(lengths) and int(lengths.max()) > token_budget
    the_plan = no_sharing(len(lengths))
    if long and kernel.rows:
        i = int(np.argmax(lengths > token_budget))
        raise ValueError(
            f"request {i if names is None else names[i]} has {int(lengths[i])} tokens but token_budget is {token_budget}, and backend {kernel.name!r} "
            "lays requests out in rows, so it cannot prefill a prompt in chunks (use a varlen backend such as "
            "'sdpa_varlen', or raise token_budget)"
        )
    # a mixer's conv / recurrent state does not continue a shared prefix or an earlier chunk (prepack.mixers)
    stateful = continuation_refusal(model) if (share_prefixes or long) else None
    if long and stateful:
        i = int(np.argmax(lengths > token_budget))
        raise UnsupportedModelError(
            f"request {i if names is None else names[i]} has {int(lengths[i])} tokens but token_budget is {token_budget}, "
            f"and {type(model).__name__} cannot prefill a prompt in chunks exactly: {stateful} (raise token_budget to its length)"
        )
    if not kernel.rows and vision is None:
        dep = rope_dependence(model) if (share_prefixes or long) else None
        if share_prefixes and dep is None and not stateful:
            limits = np.maximum(lengths - 1, 0)
            if reduce is not None and spans is not None:  # a shared output row could not be reduced per request
                limits = np.minimum(limits, spans[:, 0])
            the_plan = plan_prefixes(tokens, limits=limits)
        if long and dep is not None:
            _check_chunk_rope(model, dep, lengths, token_budget, names)
    if kernel.rows or vision is not None or (the_plan.num_prefixes == 0 and not long):
        run = run_packed(
            model, tokens, backend=kernel, token_budget=token_budget, capacity=capacity, spans=spans,
            output=output, reduce=reduce, kv=kv, lengths=lengths, vision=vision,
        )
        total = int(lengths.sum())
        return StagedRun(run.backend, run.batch, run.chunks, layout.Parts.whole(run.chunk, run.starts, lengths), run.values, total, 0)
    return _Stages(model, tokens, lengths, the_plan, spans, token_budget).run(
        kernel, capacity, output, reduce, kv
    )


def _check_chunk_rope(model, dep, lengths: np.ndarray, budget: int, names=None) -> None:
    """Refuse a long request whose chunks would get other RoPE frequencies than the whole request."""
    for i, n in enumerate(lengths.tolist()):
        ends = range(budget, n, budget)
        if n > budget and any(dep.key(e) != dep.key(n) for e in ends):
            raise ValueError(
                f"request {i if names is None else names[i]} has {n} tokens but token_budget is {budget}, and {type(model).__name__}'s "
                f"{dep.describe()} gives a chunk of it other rotary frequencies than the whole request: prepack "
                "cannot prefill it in chunks exactly (raise token_budget to its length)"
            )


class _Stages:
    """One staged call: the sequences, their pieces, and where each piece's keys and outputs went."""

    def __init__(self, model, tokens, lengths: np.ndarray, the_plan: PrefixPlan, spans, budget: int | None):
        self.model, self.lengths, self.plan, self.budget = model, lengths, the_plan, budget
        n = len(lengths)
        self.spans = spans
        self.out_start = layout.starts(spans[:, 1] - spans[:, 0]) if spans is not None else None
        prefixes = []
        for j, (src, p) in enumerate(zip(the_plan.sources.tolist(), the_plan.prefix_lengths.tolist())):
            members = np.flatnonzero(the_plan.prefix_of == j)
            prefixes.append(_Seq(tokens[src][:p], -1, 0, self._hull(members, p)))
        requests = []
        for i in range(n):
            off = int(the_plan.shared[i])
            span = (0, 0)
            if spans is not None:
                s, e = spans[i].tolist()
                span = (max(s - off, 0), max(e - off, 0)) if e > max(s, off) else (0, 0)
            requests.append(_Seq(np.asarray(tokens[i])[off:], int(the_plan.prefix_of[i]), off, span))
        self.stages = [prefixes, requests]
        cut = budget or max(int(lengths.max()), 1)
        # per stage, per sequence: (start, size) of each piece
        self.cuts = [[[(a, min(cut, len(q.tokens) - a)) for a in range(0, len(q.tokens), cut)] for q in st] for st in self.stages]
        self.where: list[list[list[tuple[int, int, int]]]] = [[[] for _ in st] for st in self.stages]  # (chunk, start, size)
        self.cache_chunks: list = []
        self.attn_chunks: list = []

    def _hull(self, members: np.ndarray, p: int) -> tuple[int, int]:
        """The outputs a shared prefix computes: every member's span inside its first ``p`` tokens, hull of them."""
        if self.spans is None:
            return (0, 0)
        s, e = self.spans[members, 0], np.minimum(self.spans[members, 1], p)
        inside = e > s
        return (int(s[inside].min()), int(e[inside].max())) if inside.any() else (0, 0)

    def run(self, kernel, capacity, output, reduce, kv) -> StagedRun:
        n = len(self.lengths)
        device = model_device(self.model)
        out = None
        batch = None
        for stage, seqs in enumerate(self.stages):
            rounds = max((len(c) for c in self.cuts[stage]), default=0)
            for r in range(rounds):
                ids = [v for v, c in enumerate(self.cuts[stage]) if len(c) > r]
                continued = stage == 0 or any(len(self.cuts[stage][v]) > r + 1 for v in ids)
                keep = ("both" if kv == "cache" else "attention") if continued else kv
                pieces = [self.cuts[stage][v][r] for v in ids]
                piece_tokens = [seqs[v].tokens[a : a + m] for v, (a, m) in zip(ids, pieces)]
                piece_spans, copies = self._outputs(stage, ids, pieces)
                wants = piece_spans is not None and bool((piece_spans[:, 1] > piece_spans[:, 0]).any())
                rowmap = None
                if wants and reduce is not None:
                    rowmap = torch.from_numpy(layout.ranges(copies[1], copies[2])).to(device)
                run = run_packed(
                    self.model, piece_tokens, backend=kernel, token_budget=self.budget,
                    capacity=capacity, spans=piece_spans if wants else None, output=output,
                    reduce=None if rowmap is None else (lambda v, rows, m=rowmap: reduce(v, m[rows])),
                    kv=keep, prefix=self._prefix(stage, ids, r),
                )
                batch = run.batch
                self._record(stage, ids, pieces, run, keep)
                if wants and run.values is not None and run.values.shape[0]:
                    if out is None:
                        total = int(self.out_start[-1] + self.spans[-1, 1] - self.spans[-1, 0])
                        out = run.values.new_empty((total,) + tuple(run.values.shape[1:]))
                    src, dst = (torch.from_numpy(layout.ranges(a, copies[2])).to(device) for a in copies[:2])
                    out.index_copy_(0, dst, run.values.index_select(0, src))
        if self.spans is not None and out is None:  # no request asked for any position: (0, X)
            out = no_values(self.model, output, reduce, device)
        parts = []
        for i, q in enumerate(self.stages[1]):
            earlier = self.where[0][q.parent] if q.parent >= 0 else []
            parts += [(i, c, s, m) for c, s, m in earlier + self.where[1][i]]
        tokens_run = sum(m for st in self.cuts for c in st for _, m in c)
        return StagedRun(
            kernel.name, batch, self.cache_chunks if kv == "cache" else [[] for _ in self.cache_chunks],
            layout.Parts.join(parts, n), out, tokens_run, int(self.lengths.sum()) - tokens_run,
        )

    def _outputs(self, stage: int, ids: list[int], pieces: list[tuple[int, int]]):
        """The run's (n, 2) spans in piece coordinates, and (src, dst, count) row copies into the result."""
        if self.spans is None:
            return None, None
        seqs = self.stages[stage]
        spans = np.array([(min(max(seqs[v].span[0] - a, 0), m), min(max(seqs[v].span[1] - a, 0), m)) for v, (a, m) in zip(ids, pieces)], np.int64).reshape(-1, 2)
        spans[:, 1] = np.maximum(spans[:, 1], spans[:, 0])
        run_start = layout.starts(spans[:, 1] - spans[:, 0])  # where each piece's outputs begin in the run's values
        src, dst, count = [], [], []
        for k, (v, (a, _)) in enumerate(zip(ids, pieces)):
            lo, hi = a + spans[k, 0], a + spans[k, 1]  # in the sequence's coordinates
            if hi <= lo:
                continue
            # the requests that take these rows: the request itself, or every member of a shared prefix
            owners = [v] if stage == 1 else np.flatnonzero(self.plan.prefix_of == v).tolist()
            for i in owners:
                off = self.stages[1][i].offset if stage == 1 else 0
                s, e = self.spans[i].tolist()
                take_lo, take_hi = max(lo + off, s), min(hi + off, e)  # in the request's coordinates
                if take_hi > take_lo:
                    src.append(run_start[k] + take_lo - off - lo)
                    dst.append(self.out_start[i] + take_lo - s)
                    count.append(take_hi - take_lo)
        arr = lambda x: np.asarray(x, np.int64)  # noqa: E731
        return spans, (arr(src), arr(dst), arr(count))

    def _prefix(self, stage: int, ids: list[int], r: int) -> Prefix | None:
        """The earlier pieces each sequence of this round continues: its shared prefix's, then its own."""
        rows = []
        for k, v in enumerate(ids):
            q = self.stages[stage][v]
            earlier = self.where[0][q.parent] if stage == 1 and q.parent >= 0 else []
            rows += [(k, c, s, m) for c, s, m in earlier + self.where[stage][v][:r]]
        if not rows:
            return None
        return Prefix(self.attn_chunks, layout.Parts.join(rows, len(ids)))

    def _record(self, stage: int, ids: list[int], pieces, run, keep) -> None:
        """Add the run's forwards to the call's chunk lists; note where each piece's tokens went."""
        offset = len(self.cache_chunks)
        for f in range(len(run.chunks)):
            self.cache_chunks.append(run.chunks[f] if keep in ("cache", "both") else [])
            self.attn_chunks.append(run.attention[f] if keep == "both" else run.chunks[f] if keep == "attention" else [])
        for k, (v, (_, m)) in enumerate(zip(ids, pieces)):
            self.where[stage][v].append((offset + int(run.chunk[k]), int(run.starts[k]), m))
