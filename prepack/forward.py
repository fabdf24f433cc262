"""Step 4 of the data flow, the engine under every prefill-only job: one packed forward, outputs where asked.

:func:`run_packed` plans and packs token sequences, runs the model once per
micro-batch with prepack's attention (:func:`~prepack.hf.packed_forward`), and
returns what the caller asked for: each layer's keys and values (for
:func:`~prepack.prefill`'s caches) and/or outputs at chosen token positions of
each request. :func:`forward_at` is its public face; scoring, classification
and embeddings (:mod:`prepack.scoring`, :mod:`prepack.heads`) are thin layers
on top of it.

Outputs are computed only where asked: logits go through the model's own LM
head with ``logits_to_keep`` set to the chosen positions (so a (T, V) logits
tensor never exists for a T-token stream), and hidden states are the base
model's last hidden state at those positions. A ``reduce`` callback may shrink
each forward's outputs (log-probabilities of target tokens, say) before the
next forward runs.

A :class:`Prefix` lets requests continue keys and values that an earlier
packed prefill computed: a context shared by several continuations is
prefilled once, and each continuation attends to it through varlen attention
with ``cu_seqlens_k`` longer than ``cu_seqlens_q`` (flash-attn's bottom-right
causal alignment).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence

import numpy as np
import torch

from . import layout
from .attention import resolve_backend
from .hf import model_device, packed_forward
from .packing import PackedBatch, pack_plan
from .planner import check_capacity, plan

# Backends that lay requests out as rows of ``capacity`` tokens, each row under a dense (C, C)
# block-diagonal mask (the prepacking paper's layout). Every other backend gets one varlen
# stream of at most ``token_budget`` tokens per forward.
ROW_BACKENDS = ("sdpa_masked",)

Output = Literal["logits", "hidden_states"]
OUTPUTS: tuple[str, ...] = ("logits", "hidden_states")
Positions = Literal["last", "all"] | Sequence[tuple[int, int]]
Reduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Prefix:
    """Keys and values that precede each request, taken from an earlier varlen prefill.

    Request i continues a sequence whose first ``lengths[i]`` tokens were already run: its
    queries attend to those keys too, and its position ids start at ``lengths[i]``.

    Attributes:
        layers: per layer (keys, values), each (1, H_kv, S, D): a varlen prefill's flat stream
            (:attr:`prepack.PrefillResult.layers`).
        starts: (N,) int64, where request i's prefix begins in that stream.
        lengths: (N,) int64, how many prefix tokens request i continues (>= 1).
    """

    layers: list
    starts: np.ndarray
    lengths: np.ndarray


class PackedRun(NamedTuple):
    """What :func:`run_packed` returns.

    Attributes:
        batch: the :class:`~prepack.packing.PackedBatch` of the non-empty requests.
        backend: the attention backend that ran (``"auto"`` resolved).
        layers: per layer packed (keys, values), each (B, H_kv, L, D), RoPE applied; [] without ``keep_kv``.
        starts: (N,) int64, where each request's first token sits in the layers' (B * L) token axis.
        values: (K, ...) the outputs at the chosen positions (after ``reduce``), request after
            request in request order, K = the total span length; None without ``spans``.
    """

    batch: PackedBatch
    backend: str
    layers: list
    starts: np.ndarray
    values: torch.Tensor | None


def forward_at(
    model,
    sequences: Sequence,
    positions: Positions = "last",
    *,
    output: Output = "logits",
    reduce: Reduce | None = None,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
):
    """Run many sequences through ``model`` in one packed forward; return outputs at chosen positions.

    Exact against running each sequence alone: attention never crosses requests and position
    ids restart at 0 for each.

    Args:
        model: a decoder-only transformers model whose attention goes through ``AttentionInterface``.
        sequences: N requests, each a list of token ids or a 1-D integer tensor/array.
        positions: ``"last"`` (each request's last token), ``"all"`` (every token), or N
            ``(start, end)`` spans, ``0 <= start <= end <= len(request)``, in each request's own
            token coordinates.
        output: ``"logits"`` (the model's LM head, computed only at those positions) or
            ``"hidden_states"`` (the base model's last hidden state, final norm applied).
        reduce: ``reduce(values, rows) -> (K, ...)``, applied to each forward's (K, V or D)
            outputs before the next forward runs, so that long outputs never pile up; ``rows``
            (K,) int64 says where each row lands in the request-order result.
        backend, token_budget, capacity: as in :func:`prepack.prefill`.

    Returns:
        ``"last"``: an (N, X) tensor. Otherwise a list of N tensors, the i-th (end_i - start_i, X).
        X is V for logits, D for hidden states, or what ``reduce`` returns.
    """
    from .prefill import check_prompts  # prefill builds on this module

    tokens = check_prompts(model, sequences)
    lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    spans = request_spans(positions, lengths)
    run = run_packed(
        model, tokens, backend=backend, token_budget=token_budget, capacity=capacity,
        spans=spans, output=output, reduce=reduce, keep_kv=False,
    )
    if isinstance(positions, str) and positions == "last":
        return run.values
    return list(run.values.split((spans[:, 1] - spans[:, 0]).tolist()))


def request_spans(positions: Positions, lengths: np.ndarray) -> np.ndarray:
    """``positions`` as (N, 2) int64 ``[start, end)`` per request; errors name the request and the limit."""
    n = len(lengths)
    if isinstance(positions, str):
        if positions == "last":
            return np.stack([lengths - 1, lengths], 1)
        if positions == "all":
            return np.stack([np.zeros(n, np.int64), lengths], 1)
        raise ValueError(f"positions must be 'last', 'all' or one (start, end) span per request, got {positions!r}")
    spans = np.asarray(positions, dtype=np.int64) if len(positions) else np.zeros((0, 2), np.int64)
    if spans.shape != (n, 2):
        raise ValueError(f"positions must hold one (start, end) span per request: got shape {spans.shape} for {n} requests")
    for i, (s, e) in enumerate(spans.tolist()):
        if not 0 <= s <= e <= lengths[i]:
            raise ValueError(f"request {i} has {lengths[i]} tokens but its span is ({s}, {e}); need 0 <= start <= end <= {lengths[i]}")
    return spans


def run_packed(
    model,
    tokens: Sequence[np.ndarray],
    *,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    spans: np.ndarray | None = None,
    output: Output = "logits",
    reduce: Reduce | None = None,
    keep_kv: bool = True,
    prefix: Prefix | None = None,
) -> PackedRun:
    """The packed forward over checked token arrays (zero-length ones allowed: they take no slot).

    Args:
        tokens: N int64 arrays, already checked (:func:`prepack.prefill.check_prompts`).
        spans: (N, 2) int64 ``[start, end)`` per request: where to return outputs (None: nowhere).
        output: ``"logits"`` or ``"hidden_states"``.
        reduce: see :func:`forward_at`.
        keep_kv: keep each layer's keys and values (for per-request caches).
        prefix: keys and values each request continues (varlen backends only).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    device, dtype = model_device(model), next(model.parameters()).dtype
    name = resolve_backend(backend, device=device, dtype=dtype)
    rows_layout = name in ROW_BACKENDS
    if prefix is not None and rows_layout:
        raise ValueError(f"backend {name!r} lays requests out in rows and cannot continue a shared prefix; use a varlen backend")
    if spans is not None and output == "logits":
        check_lm_head(model)
    if token_budget is not None:
        token_budget = check_capacity(token_budget, "token_budget")
    if capacity is not None:
        capacity = check_capacity(capacity)
        if not rows_layout:
            raise ValueError(
                f"capacity applies to backend='sdpa_masked', which packs rows of capacity tokens; backend {name!r} "
                "runs one varlen stream per forward: bound it with token_budget instead"
            )
    lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    real = np.flatnonzero(lengths)
    real_lengths = lengths[real]
    longest = int(real_lengths.max()) if len(real) else 1
    if rows_layout:
        row_len = capacity or longest
        layout.check_fits(real_lengths, row_len, ids=real, hint="raise capacity")
        if token_budget is not None and row_len > token_budget:
            raise ValueError(f"capacity {row_len} exceeds token_budget {token_budget}: one row must fit in one forward")
    else:
        row_len = token_budget or max(1, int(real_lengths.sum()))
        layout.check_fits(real_lengths, row_len, ids=real, limit_name="token_budget", hint="raise token_budget")
    batch = pack_plan(plan(real_lengths, row_len), [tokens[i] for i in real])
    p = batch.plan
    # a forward takes as many rows as the budget allows; a varlen row is already one budget's worth
    per_call = max(1, (token_budget or p.num_rows * p.capacity) // p.capacity) if rows_layout else 1
    calls = [slice(a, min(a + per_call, p.num_rows)) for a in range(0, p.num_rows, per_call)]

    select = None
    if spans is not None:
        span_len = spans[:, 1] - spans[:, 0]
        out_start = layout.starts(span_len)  # where request i's outputs begin in the result
        select = (spans[real, 0], span_len[real], out_start[real])
    sub_prefix = None if prefix is None else Prefix(prefix.layers, prefix.starts[real], prefix.lengths[real])

    chunks, values, rows_of = [], [], []
    with torch.no_grad(), packed_forward(model):
        for rows in calls:
            kv, out, where = _forward(model, batch, rows, name, device, select, output, reduce, keep_kv, sub_prefix)
            chunks.append(kv)
            if out is not None:
                values.append(out)
                rows_of.append(where)
    # calls add rows (row layout) or extend the one flat stream (varlen)
    cat_dim = 0 if rows_layout else 2
    layers = [tuple(_cat(xs, cat_dim) for xs in zip(*per_call)) for per_call in zip(*chunks)] if keep_kv else []

    starts = np.zeros(len(tokens), np.int64)
    starts[real] = p.row * p.capacity + p.offset if rows_layout else batch.stream_starts
    result = None
    if spans is not None:
        if values:
            packed, where = torch.cat(values), torch.cat(rows_of)
            result = packed.new_empty(packed.shape).index_copy_(0, where, packed)
        else:
            result = torch.zeros(0, device=device)
    return PackedRun(batch=batch, backend=name, layers=layers, starts=starts, values=result)


def check_lm_head(model) -> None:
    """Refuse logits from a model whose forward cannot compute them at chosen positions only."""
    if "logits_to_keep" not in _forward_params(type(model)):
        raise TypeError(
            f"{type(model).__name__} has no language-model head that takes logits_to_keep, so prepack cannot "
            "return its logits; ask for output='hidden_states', or use prepack.classify for a sequence-classification model"
        )


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def base_model(model):
    """The decoder stack under a task head (``model.model`` for ``LlamaForCausalLM``); its output is the last hidden state."""
    base = getattr(model, "base_model", model)
    return model if base is None else base


def _cat(xs: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)


class _PrefixKV:
    """Puts each request's prefix keys/values in front of its new ones, per layer (consumed by ``prepack_attention``)."""

    def __init__(self, layers: list, src: torch.Tensor, dst_prefix: torch.Tensor, dst_new: torch.Tensor, total: int):
        self.layers, self.src, self.dst_prefix, self.dst_new, self.total = layers, src, dst_prefix, dst_new, total

    def extend(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, n, D) keys and values of the new tokens -> (1, H_kv, total, D) with the prefixes in place."""
        past_k, past_v = self.layers[layer_idx]
        return self._merge(past_k, key), self._merge(past_v, value)

    def _merge(self, past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        out = new.new_empty(1, new.shape[1], self.total, new.shape[3])
        out.index_copy_(2, self.dst_prefix, past.index_select(2, self.src))
        return out.index_copy_(2, self.dst_new, new)


def _forward(model, batch: PackedBatch, rows: slice, backend: str, device, select, output: str, reduce, keep_kv: bool, prefix):
    """One forward pass over ``rows`` of ``batch``.

    Args:
        select: None, or (starts, lengths, out_starts) per request (plan order): the span of each
            request's own tokens to return outputs at, and where they land in the result.

    Returns:
        per layer (keys, values) as the attention function saw them (empty without ``keep_kv``),
        the (K, ...) outputs of the call's spans (None without ``select``), and (K,) their rows
        in the request-order result.
    """
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # filled by prepack_attention, one entry per layer
    kwargs = {"use_cache": False, "prepack_backend": backend}
    if keep_kv:
        kwargs["prepack_kv"] = captured
    p = batch.plan
    order = p.order[batch.row_ptr[rows.start] : batch.row_ptr[rows.stop]]
    lengths = p.lengths[order]
    if backend in ROW_BACKENDS:
        ids, pos = batch.input_ids[rows], batch.position_ids[rows]
        first = (p.row[order] - rows.start) * p.capacity + p.offset[order]
        kwargs["prepack_row_mask"] = functools.lru_cache(maxsize=None)(
            lambda window: batch.attention_mask("bool", window=window, rows=rows).to(device)
        )
    else:
        v = batch.to_varlen(rows)
        ids, pos = v.input_ids[None], v.position_ids[None]
        cu = v.cu_seqlens.to(device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=v.max_seqlen, max_length_k=v.max_seqlen)
        first = v.cu_seqlens[:-1].numpy().astype(np.int64)
        if prefix is not None:
            kwargs.update(_prefix_kwargs(prefix, order, lengths, device))
            pos = pos + torch.from_numpy(np.repeat(prefix.lengths[order], lengths))[None]
    ids, pos = ids.to(device), pos.to(device)
    if select is None:
        # only the keys and values are wanted: the decoder stack, no head at all
        base_model(model)(input_ids=ids, position_ids=pos, **kwargs)
        return captured, None, None

    span_start, span_len, out_start = (a[order] for a in select)
    seq_len = ids.shape[1]
    at = layout.ranges(first + span_start, span_len)  # in the call's flattened (B * L) token axis
    where = torch.from_numpy(layout.ranges(out_start, span_len)).to(device)
    if output == "logits":
        # the LM head (and any final soft-capping) runs at the kept columns only
        keep, col = np.unique(at % seq_len, return_inverse=True)
        out = model(input_ids=ids, position_ids=pos, logits_to_keep=torch.from_numpy(keep).to(device), **kwargs).logits
        values = out.reshape(-1, out.shape[-1])[torch.from_numpy(at // seq_len * len(keep) + col).to(device)]
    else:
        hidden = base_model(model)(input_ids=ids, position_ids=pos, **kwargs).last_hidden_state
        values = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(at).to(device)]
    if reduce is not None:
        values = reduce(values, where)
    return captured, values, where


def _prefix_kwargs(prefix: Prefix, order: np.ndarray, lengths: np.ndarray, device) -> dict:
    """Attention kwargs for a call whose requests continue ``prefix``: keys are [prefix, new tokens] per request."""
    plen = prefix.lengths[order]
    kv_len = plen + lengths
    cu_k = layout.cu_seqlens(kv_len)
    k_first = cu_k[:-1].astype(np.int64)

    def idx(a):
        return torch.from_numpy(a).to(device)

    gather = _PrefixKV(
        prefix.layers,
        src=idx(layout.ranges(prefix.starts[order], plen)),
        dst_prefix=idx(layout.ranges(k_first, plen)),
        dst_new=idx(layout.ranges(k_first + plen, lengths)),
        total=int(kv_len.sum()),
    )
    return {"prepack_prefix": gather, "cu_seq_lens_k": torch.from_numpy(cu_k).to(device), "max_length_k": int(kv_len.max())}
