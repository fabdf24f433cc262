"""Step 4 of the data flow, the engine under every prefill-only job: one packed forward, outputs where asked.

:func:`run_packed` plans and packs token sequences, runs the model once per
micro-batch with prepack's attention (each forward carries a :class:`~prepack.step.PackedCall`), and
returns what the caller asked for: each layer's keys and values (for
:func:`~prepack.prefill`'s caches) and/or outputs at chosen token positions of
each request. :func:`prepack.outputs.forward_at` is its public face (through
:func:`prepack.staged.run_staged`, which shares prefixes and chunks long
prompts); scoring, classification and embeddings (:mod:`prepack.scoring`,
:mod:`prepack.heads`) are thin layers on top of them.

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

from . import kvcache, layout
from .backends import KERNELS, Kernel, choose
from .hf import attention_needs, cache_kwarg, model_device, switched
from .packing import PackedBatch, pack_plan
from .planner import check_capacity, plan
from .rope import grouped_plan, rope_groups
from .mixers.states import MixerCapture, SegmentCaches
from .mixers.states import layer_indices as mixer_layers
from .step import PackedCall, PrefixKV, RecordKV, StepLayout
from .support import UnsupportedModelError, stateless_layers
from .wrapped import check_mode, runner, unwrap

# Backends that lay requests out as rows of ``capacity`` tokens, each row under a dense (C, C)
# block-diagonal mask (the prepacking paper's layout): the kernels that declare ``rows``. Every
# other backend gets one varlen stream of at most ``token_budget`` tokens per forward.
ROW_BACKENDS = tuple(name for name, kernel in KERNELS.items() if kernel.rows)

Output = Literal["logits", "hidden_states"]
OUTPUTS: tuple[str, ...] = ("logits", "hidden_states")
Reduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# What a run keeps of each layer's keys and values: nothing, what the model caches (for per-request
# caches; MLA caches compressed latents), what attention sees (for continuing a shared prefix), or both.
KeepKV = Literal[None, "cache", "attention", "both"]


@dataclass(frozen=True, eq=False)
class Prefix:
    """Keys and values that precede each request, taken from earlier varlen forwards.

    Request i continues a sequence whose first ``lengths[i]`` tokens were already run: its
    queries attend to those keys too, and its position ids start at ``lengths[i]``. Those tokens
    may sit in several pieces of several earlier forwards (a shared prefix, then the earlier
    chunks of a long prompt): ``parts`` lists them in token order.

    Attributes:
        chunks: per forward, per layer (keys, values) as attention saw them, each (1, H_kv, S, D):
            the flat streams of varlen :func:`run_packed` calls with ``kv="attention"`` (or ``"both"``).
        parts: where each request's earlier tokens sit in ``chunks`` (:class:`~prepack.layout.Parts`;
            a request with none continues nothing).
    """

    chunks: list
    parts: layout.Parts

    @classmethod
    def whole(cls, chunks: list, chunk: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> "Prefix":
        """Request i continues ``lengths[i]`` tokens at ``starts[i]`` of ``chunks[chunk[i]]``."""
        return cls(chunks, layout.Parts.whole(chunk, starts, lengths))

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64, how many earlier tokens request i continues."""
        return self.parts.lengths


class PackedRun(NamedTuple):
    """What :func:`run_packed` returns.

    Attributes:
        batch: the :class:`~prepack.packing.PackedBatch` of the non-empty requests.
        backend: the attention backend that ran (``"auto"`` resolved).
        chunks: per forward, per layer (keys, values), each (B, H_kv, L, D), as ``kv`` asked (what the
            model caches for ``"both"``; [] per forward without ``kv``). Kept where the forward left them.
        chunk: (N,) int64, the forward that holds each request.
        starts: (N,) int64, where each request's first token sits in its chunk's (B * L) token axis.
        values: (K, ...) the outputs at the chosen positions (after ``reduce``), request after
            request in request order, K = the total span length; None without ``spans``.
        attention: with ``kv="both"``, per forward, per layer (keys, values) as attention saw them
            (a :class:`Prefix`'s chunks); else [].
    """

    batch: PackedBatch
    backend: str
    chunks: list
    chunk: np.ndarray
    starts: np.ndarray
    values: torch.Tensor | None
    attention: list


def run_packed(
    model,
    tokens: Sequence[np.ndarray],
    *,
    backend: str | Kernel = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    spans: np.ndarray | None = None,
    output: Output = "logits",
    reduce: Reduce | None = None,
    kv: KeepKV = None,
    prefix: Prefix | None = None,
    lengths: np.ndarray | None = None,
    vision=None,
) -> PackedRun:
    """The packed forward over checked token arrays (zero-length ones allowed: they take no slot).

    Args:
        tokens: N int64 arrays, already checked (:func:`prepack.inputs.check_prompts`).
        spans: (N, 2) int64 ``[start, end)`` per request: where to return outputs (None: nowhere).
        output: ``"logits"`` or ``"hidden_states"``.
        reduce: see :func:`prepack.outputs.forward_at`.
        kv: keep each layer's keys and values: ``"cache"`` what the model caches (per-request
            caches), ``"attention"`` what attention sees (a :class:`Prefix` for later requests),
            ``"both"`` the two (``chunks`` and ``attention``; the same tensors where they agree).
        prefix: keys and values each request continues (varlen backends only).
        lengths: (N,) int64, ``len`` of each token array, where the caller has them already.
        vision: the requests' images and positions (:class:`prepack.vision.VisionPrompts`), or None.
        backend: a name, or the :class:`~prepack.backends.Kernel` the caller chose for its whole call.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    if kv not in (None, "cache", "attention", "both"):
        raise ValueError(f"kv must be None, 'cache', 'attention' or 'both', got {kv!r}")
    check_mode(model)
    device, dtype = model_device(model), next(model.parameters()).dtype
    kernel = choose(backend, device=device, dtype=dtype, needs=attention_needs(model, continues_keys=prefix is not None))
    name, rows_layout = kernel.name, kernel.rows
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
    if vision is not None and (rows_layout or prefix is not None):
        raise ValueError(
            f"prompts with images run on a varlen backend without a prefix (got backend {name!r}"
            f"{' and a prefix' if prefix is not None else ''}); use backend='auto'"
        )
    lengths = layout.lengths_of(tokens) if lengths is None else lengths
    real = np.flatnonzero(lengths)
    real_lengths = lengths[real]
    longest = int(real_lengths.max()) if len(real) else 1
    if token_budget is None:  # ours, not the caller's: never a reason to refuse a prompt
        token_budget = max(default_token_budget(model), longest if not rows_layout else capacity or longest)
    # The planner's rows: `capacity` tokens under one dense mask each (several rows per forward),
    # or one varlen stream of at most `token_budget` tokens (one row per forward).
    if rows_layout:
        capacity = capacity or longest
        layout.check_fits(real_lengths, capacity, ids=real, hint="raise capacity")
        if capacity > token_budget:
            raise ValueError(f"capacity {capacity} exceeds token_budget {token_budget}: one row must fit in one forward")
    else:
        layout.check_fits(real_lengths, token_budget, ids=real, limit_name="token_budget", hint="raise token_budget")
    # length-dependent RoPE (longrope, dynamic NTK): a forward holds only requests whose frequencies agree
    reach = real_lengths + (prefix.lengths[real] if prefix is not None else 0)
    groups = rope_groups(model, reach, ids=real)
    row_cap = capacity if rows_layout else token_budget
    the_plan, bounds = plan(real_lengths, row_cap), None
    if groups is not None:
        the_plan, bounds = grouped_plan(real_lengths, row_cap, groups)
    batch = pack_plan(the_plan, [tokens[i] for i in real])
    p = batch.plan
    # a forward takes as many rows as the budget allows (of one RoPE group); a varlen row is already one budget's worth
    per_call = max(1, token_budget // p.capacity) if rows_layout else 1
    bounds = bounds or [0, p.num_rows]
    calls = [
        slice(a, min(a + per_call, end)) for start, end in zip(bounds[:-1], bounds[1:]) for a in range(start, end, per_call)
    ]

    select = None
    if spans is not None:
        span_len = spans[:, 1] - spans[:, 0]
        out_start = layout.starts(span_len)  # where request i's outputs begin in the result
        select = (spans[real, 0], span_len[real], out_start[real])
    sub_prefix, sub_vision = None, None if vision is None else vision.take(real)
    if prefix is not None:
        sub_prefix = Prefix(prefix.chunks, prefix.parts.select(real))

    chunks, attention, values, rows_of = [], [], [], []
    with switched(model), torch.no_grad():
        for rows in calls:
            layers, seen, out, where = _forward(model, batch, rows, kernel, device, select, output, reduce, kv, sub_prefix, sub_vision)
            chunks.append(layers)
            if kv == "both":
                attention.append(seen)
            if out is not None:
                values.append(out)
                rows_of.append(where)

    # which forward holds each request, and where it starts in that forward's flattened (B * L) tokens
    chunk, starts = np.zeros(len(tokens), np.int64), np.zeros(len(tokens), np.int64)
    for c, rows in enumerate(calls):
        seg = batch.segments(rows)
        chunk[real[seg.order]] = c
        starts[real[seg.order]] = seg.grid_start if rows_layout else seg.stream_start
    result = None
    if spans is not None:
        if values:
            packed, where = torch.cat(values), torch.cat(rows_of)
            result = packed.new_empty(packed.shape).index_copy_(0, where, packed)
        else:  # nothing ran (no requests, or only empty ones): still (0, X), as a run would give
            result = no_values(model, output, reduce, device)
    return PackedRun(batch=batch, backend=name, chunks=chunks, chunk=chunk, starts=starts, values=result, attention=attention)


def default_token_budget(model) -> int:
    """Tokens per forward when the caller sets no ``token_budget``.

    * CPU: 8192. Longer streams are not faster, and their memory grows with the stream
      (``benchmarks/bench_token_budget.py``, recorded in ``docs/prefill.md``).
    * CUDA: what a quarter of the free device memory holds, counting per token the keys and values
      kept for every layer plus eight hidden-size-or-MLP-width activations of the layer being run,
      clamped to [4096, 131072].
    """
    device = model_device(model)
    if device.type != "cuda":
        return 8192
    config = model.config.get_text_config(decoder=True)
    hidden = getattr(config, "hidden_size", 4096)
    width = max(hidden, getattr(config, "intermediate_size", hidden) or hidden)
    heads = getattr(config, "num_attention_heads", 32)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    layers = getattr(config, "num_hidden_layers", 32)
    per_token = (2 * layers * kv_dim + 8 * width) * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(max(free // 4 // per_token, 4096), 131072))


def no_values(model, output: str, reduce, device) -> torch.Tensor:
    """(0, X) outputs of the width and dtype a forward gives: X is V (the LM head's), D, or what ``reduce`` makes of them."""
    dtype = next(model.parameters()).dtype
    hidden = torch.zeros(0, model.config.get_text_config(decoder=True).hidden_size, dtype=dtype, device=device)
    values = model.get_output_embeddings()(hidden) if output == "logits" else hidden
    return values if reduce is None else reduce(values, torch.zeros(0, dtype=torch.long, device=device))


def check_lm_head(model) -> None:
    """Refuse logits from a model whose forward cannot compute them at chosen positions only."""
    # the class's signature, of the model under any wrapper (a PeftModel's forward takes **kwargs; a replaced
    # forward may be a lambda): it is the class's forward that the call reaches
    if "logits_to_keep" not in _forward_params(type(unwrap(model))):
        raise TypeError(
            f"{type(unwrap(model)).__name__} has no language-model head that takes logits_to_keep, so prepack cannot "
            "return its logits; ask for output='hidden_states', or use prepack.classify for a sequence-classification model"
        )


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def base_model(model):
    """The decoder stack under a task head (``model.model`` for ``LlamaForCausalLM``); its output is the last hidden state.

    Under a wrapper (PEFT, ``torch.compile``) it is the wrapped model's: adapters injected into its layers apply.
    """
    model = unwrap(model)
    base = getattr(model, "base_model", model)
    return model if base is None else base


def _forward(model, batch: PackedBatch, rows: slice, kernel: Kernel, device, select, output: str, reduce, kv, prefix, vision=None):
    """One forward pass over ``rows`` of ``batch``.

    Args:
        select: None, or (starts, lengths, out_starts) per request (plan order): the span of each
            request's own tokens to return outputs at, and where they land in the result.
        kv: what to keep of each layer's keys and values (see :func:`run_packed`).
        vision: the images and positions of the batch's requests (plan order), or None.

    Returns:
        per layer (keys, values) as ``kv`` asked (what the model caches for ``"both"``; empty without
        ``kv``), per layer (keys, values) as attention saw them (``"both"`` only), the (K, ...) outputs of
        the call's spans (None without ``select``), and (K,) their rows in the request-order result.
    """
    kwargs: dict = {"use_cache": False}
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # kv="cache"/"both": layer_idx -> what the model caches
    cache = states = None
    if kv in ("cache", "both"):
        cache = kvcache.recording_cache(model.config, records)
        kwargs.update({"use_cache": True, cache_kwarg(model): cache})
        if mixer_layers(model):  # each request's conv / recurrent states, in a cache of the model's own class
            states = SegmentCaches(model.config)
    seg = batch.segments(rows)
    order, lengths = seg.order, seg.lengths
    record = kv in ("attention", "both")  # keys as attention sees them, for later calls to continue
    if kernel.rows:
        ids, pos = batch.input_ids[rows], batch.position_ids[rows]
        first = seg.grid_start
        row_mask = functools.lru_cache(maxsize=None)(
            lambda window, chunk: batch.attention_mask("bool", window=window, chunk=chunk, rows=rows).to(device)
        )
        call = PackedCall(StepLayout(lengths, lengths, device), kernel, kv=RecordKV() if record else None, row_mask=row_mask, states=states)
    else:
        v = batch.to_varlen(rows)
        ids, pos = v.input_ids[None], v.position_ids[None]
        first = seg.stream_start
        k_lengths, earlier = lengths, None
        if prefix is not None:
            earlier, k_lengths = _earlier_keys(prefix, order, lengths, device)
            # position ids continue after the earlier tokens each segment's keys start with
            pos = pos + torch.from_numpy(np.repeat(k_lengths - lengths, lengths))[None]
        call = PackedCall(StepLayout(lengths, k_lengths, device), kernel, kv=RecordKV(earlier) if record else earlier, states=states)
    kwargs["prepack"] = call
    ids, pos = ids.to(device), pos.to(device)
    if vision is not None:  # the call's images through the vision tower once; mRoPE rows per request
        pos, images = vision.forward_inputs(model, order, lengths, np.zeros(len(order), np.int64), pos)
        kwargs.update(images)
    values = where = None
    if select is None:
        # only the keys and values are wanted: the decoder stack, no head at all
        base_model(model)(input_ids=ids, position_ids=pos, **kwargs)
    else:
        span_start, span_len, out_start = (a[order] for a in select)
        seq_len = ids.shape[1]
        at = layout.ranges(first + span_start, span_len)  # in the call's flattened (B * L) token axis
        where = torch.from_numpy(layout.ranges(out_start, span_len)).to(device)
        if output == "logits":
            # the LM head (and any final soft-capping) runs at the kept columns only
            keep, col = np.unique(at % seq_len, return_inverse=True)
            out = runner(model)(input_ids=ids, position_ids=pos, logits_to_keep=torch.from_numpy(keep).to(device), **kwargs).logits
            values = out.reshape(-1, out.shape[-1])[torch.from_numpy(at // seq_len * len(keep) + col).to(device)]
        else:
            hidden = base_model(model)(input_ids=ids, position_ids=pos, **kwargs).last_hidden_state
            values = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(at).to(device)]
        if reduce is not None:
            values = reduce(values, where)
    captured = seen = call.kv.layers if record else []
    if kv in ("cache", "both"):
        # a mixer layer caches no keys: its states are in the request's own cache (`states`)
        # (a hybrid layer, FalconH1's or Zamba's, has both: its keys are recorded too; an MLP-only layer, none)
        expected = [i for i in range(len(cache.layers)) if i not in mixer_layers(model) and i not in stateless_layers(model)]
        if not set(expected) <= set(records):
            missing = sorted(set(expected) - set(records))
            raise UnsupportedModelError(
                f"{type(model).__name__} wrote no keys and values to its cache for layer(s) {missing} of "
                f"{len(cache.layers)}; prepack builds each request's cache from what the model caches"
            )
        # "both": where attention sees what the model caches (all but MLA-like models) the two lists hold the
        # same tensors (own_storage returns the tensor itself), so the keys are held once
        captured = [records.get(i) for i in range(len(cache.layers))]
    if states is not None:  # kept beside the keys: per segment of this forward, its request's mixer states
        captured = MixerCapture(captured, {int(first[j]): c for j, c in states.caches.items()})
    return captured, seen, values, where


def _earlier_keys(prefix: Prefix, order: np.ndarray, lengths: np.ndarray, device) -> tuple[PrefixKV, np.ndarray]:
    """For a call whose requests continue ``prefix``: the gather that puts [earlier tokens, new tokens] per
    request in one key stream, and (n,) the key length of each segment."""
    parts = prefix.parts.select(order)
    plen = parts.lengths
    kv_len = plen + lengths
    k_first = layout.starts(kv_len)
    gather = PrefixKV(
        prefix.chunks,
        pieces=kvcache.chunk_pieces(parts.chunk, parts.starts, parts.sizes, parts.targets(k_first), device),
        dst_new=torch.from_numpy(layout.ranges(k_first + plen, lengths)).to(device),
        total=int(kv_len.sum()),
    )
    return gather, kv_len
