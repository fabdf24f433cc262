"""Step 4 of the data flow: one packed forward pass over many prompts.

``prefill`` plans and packs the prompts, runs the model once per micro-batch
with prepack's attention registered through ``AttentionInterface``, and keeps
what each request needs: its last-token logits and its own keys and values.
The attention function records each layer's (RoPE-applied) keys and values as
it sees them, so the packed forward runs with ``use_cache=False``: a
transformers cache would copy the whole stream once more, and a sliding-window
cache would drop tokens of the stream that other requests still need. They are
gathered into per-request layouts only on demand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import kvcache
from .attention import resolve_backend
from .hf import check_model, packed_forward
from .packing import PackedBatch, _as_token_array, pack_plan
from .planner import plan

VARLEN_BACKENDS = ("flash", "sdpa_varlen", "flex", "reference")


@dataclass(frozen=True, eq=False)
class PrefillResult:
    """What a packed prefill leaves for each of N requests.

    Attributes:
        logits: (N, V) last-token logits, in request order (None when not asked for).
        lengths: (N,) int64 tokens per request.
        batch: the :class:`~prepack.packing.PackedBatch` that was run.
        backend: the attention backend that ran.
        layers: per layer, packed (keys, values), each (B, H_kv, L, D), RoPE applied.
        src_b, src_l: (N,) int64, where each request starts in the packed layers.
        config: the model config, for building caches with the right layer types.
    """

    logits: torch.Tensor | None
    lengths: torch.Tensor
    batch: PackedBatch
    backend: str
    layers: list
    src_b: torch.Tensor
    src_l: torch.Tensor
    config: object

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def _sources(self):
        seq_len = self.layers[0][0].shape[2] if self.layers else 0
        return kvcache.token_sources(self.src_b, self.src_l, self.lengths, seq_len)

    def request_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of request ``i``, each (1, H_kv, lengths[i], D)."""
        b, l, n = int(self.src_b[i]), int(self.src_l[i]), int(self.lengths[i])
        return [(k[b : b + 1, :, l : l + n], v[b : b + 1, :, l : l + n]) for k, v in self.layers]

    @functools.cached_property
    def caches(self) -> list:
        """One transformers ``DynamicCache`` per request, holding exactly its prompt's keys and values."""
        return [kvcache.build_dynamic_cache(self.config, self.request_kv(i)) for i in range(self.num_requests)]

    def left_padded(self, pad_to: int | None = None):
        """A batched cache for ``model.generate``, left-padded to the longest prompt.

        Returns:
            ``(cache, attention_mask)``: a ``DynamicCache`` whose layers are
            (N, H_kv, pad_to, D), and an (N, pad_to) int64 mask, 1 on real tokens.
        """
        n, pad_to = self.num_requests, self._pad_to(pad_to)
        dst = kvcache.padded_targets(self.lengths, pad_to, left=True)
        mask = torch.zeros(n, pad_to, dtype=torch.long, device=self.lengths.device)
        mask.view(-1)[dst] = 1
        return kvcache.left_padded_cache(self.config, self.layers, self._sources, dst, n, pad_to), mask

    def flash_kvcache(self, extra: int = 0, *, padding: str = "right") -> kvcache.FlashKVCache:
        """Caches in ``flash_attn_with_kvcache`` layout, with room for ``extra`` decoded tokens.

        Args:
            extra: free slots after the longest prompt, for the tokens to decode.
            padding: ``"right"`` (prompts start at 0, ``cache_seqlens`` = lengths) or
                ``"left"`` (prompts end together; pass ``cache_leftpad``, flash-attn >= 2.6.1).
        """
        if padding not in ("right", "left"):
            raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
        n, longest = self.num_requests, self._pad_to(None)
        left = padding == "left"
        dst = kvcache.padded_targets(self.lengths, longest, left=left, row_len=longest + extra)
        ks, vs = [], []
        for k, v in self.layers:
            ks.append(kvcache.gather_padded(k, self._sources, dst, n, longest + extra))
            vs.append(kvcache.gather_padded(v, self._sources, dst, n, longest + extra))
        lengths = self.lengths.to(torch.int32)
        if left:
            return kvcache.FlashKVCache(ks, vs, torch.full_like(lengths, longest), longest - lengths)
        return kvcache.FlashKVCache(ks, vs, lengths, None)

    def right_padded(self, extra: int = 0) -> kvcache.FlashKVCache:
        """``flash_kvcache(extra, padding="right")``: caches (N, L, H_kv, D) plus ``cache_seqlens`` int32."""
        return self.flash_kvcache(extra, padding="right")

    def _pad_to(self, pad_to: int | None) -> int:
        longest = int(self.lengths.max()) if self.num_requests else 0
        if pad_to is None:
            return longest
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
        return pad_to


def prefill(
    model,
    sequences: Sequence,
    *,
    capacity: int | None = None,
    backend: str = "auto",
    token_budget: int | None = None,
    logits: bool = True,
) -> PrefillResult:
    """Run many prompts through ``model`` in one packed prefill.

    Args:
        model: a decoder-only transformers model whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Mistral, Gemma, ...).
        sequences: N prompts, each a list of token ids or a 1-D integer tensor/array.
        capacity: row length for masked backends (default: the longest prompt).
        backend: ``"auto"``, ``"flash"``, ``"sdpa_varlen"``, ``"flex"``, ``"sdpa_masked"`` or ``"reference"``.
        token_budget: at most this many tokens per forward pass. Varlen backends
            otherwise run all prompts as one flat stream.
        logits: compute the last-token logits.

    Returns:
        A :class:`PrefillResult`: ``.logits`` (N, V), ``.caches``,
        ``.left_padded()``, ``.right_padded()``, ``.flash_kvcache()``.
    """
    tokens = check_prompts(model, sequences)
    return _prefill(model, tokens, capacity=capacity, backend=backend, token_budget=token_budget, logits=logits)


def check_prompts(model, sequences: Sequence, *, allow_empty: bool = False) -> list[np.ndarray]:
    """Validate prompts against ``model``; errors name the request and the limit."""
    check_model(model)
    device = model_device(model)
    config = model.config.get_text_config(decoder=True)
    max_pos = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    tokens = []
    for i, s in enumerate(sequences):
        if isinstance(s, torch.Tensor) and s.device != device:
            raise ValueError(f"request {i} is on {s.device} but the model is on {device}; move it with .to({str(device)!r})")
        if allow_empty and len(s) == 0:
            tokens.append(np.zeros(0, np.int64))
            continue
        t = _as_token_array(s, i)
        if max_pos is not None and len(t) > max_pos:
            raise ValueError(f"request {i} has {len(t)} tokens but the model's max_position_embeddings is {max_pos}")
        if vocab is not None and t.max() >= vocab:
            raise ValueError(f"request {i} has token id {t.max()} but the model's vocab_size is {vocab}")
        tokens.append(t)
    return tokens


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _prefill(model, tokens, *, capacity, backend, token_budget, logits) -> PrefillResult:
    """Prefill already-checked prompts; zero-length ones get an empty cache and no logits."""
    device, dtype = model_device(model), next(model.parameters()).dtype
    name = resolve_backend(backend, device=device, dtype=dtype)
    lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    real = np.flatnonzero(lengths)
    real_lengths = lengths[real]
    masked = name not in VARLEN_BACKENDS
    longest = int(real_lengths.max()) if len(real) else 1
    if token_budget is not None and token_budget < longest:
        i = int(real[np.argmax(real_lengths)])
        raise ValueError(f"request {i} has {longest} tokens but token_budget is {token_budget}")
    if masked:
        row_len = capacity or longest
        if row_len < longest:
            i = int(real[np.argmax(real_lengths)])
            raise ValueError(f"request {i} has {longest} tokens but capacity is {row_len}")
    else:
        row_len = token_budget or max(1, int(real_lengths.sum()))
    batch = pack_plan(plan(real_lengths, row_len), [tokens[i] for i in real])
    p = batch.plan

    if masked:
        per_call = max(1, (token_budget or p.num_rows * p.capacity) // p.capacity)
        calls = [slice(a, min(a + per_call, p.num_rows)) for a in range(0, p.num_rows, per_call)]
    else:
        calls = [slice(r, r + 1) for r in range(p.num_rows)]

    chunks, last_logits = [], []
    with torch.no_grad(), packed_forward(model):
        for rows in calls:
            kv, out = _forward(model, batch, rows, name, device, logits)
            chunks.append(kv)
            if logits:
                last_logits.append(out)
    # micro-batches add rows (masked) or extend the one flat stream (varlen)
    cat_dim = 0 if masked else 2
    layers = [tuple(_cat(xs, cat_dim) for xs in zip(*per_call)) for per_call in zip(*chunks)]

    # where each request starts in the packed layers
    src_b = np.zeros(len(tokens), np.int64)
    src_l = np.zeros(len(tokens), np.int64)
    if masked:
        src_b[real], src_l[real] = p.row, p.offset
    else:
        starts = np.empty(p.num_requests, np.int64)
        starts[p.order] = batch.cu_seqlens[:-1].numpy()
        src_l[real] = starts
    out_logits = None
    if logits and len(real):
        packed = torch.cat(last_logits)  # packed order for varlen, (row, offset) order for masked too
        out_logits = packed.new_zeros(len(tokens), packed.shape[-1])
        out_logits[torch.from_numpy(real[p.order])] = packed
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return PrefillResult(
        logits=out_logits, lengths=as_t(lengths), batch=batch, backend=name, layers=layers,
        src_b=as_t(src_b), src_l=as_t(src_l), config=model.config,
    )


def _cat(xs: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)


def _forward(model, batch: PackedBatch, rows: slice, backend: str, device, want_logits: bool):
    """One forward pass over ``rows`` of ``batch``; returns per-layer (k, v) and last-token logits in packed order."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # filled by prepack_attention, one entry per layer
    kwargs = {"use_cache": False, "prepack_kv": captured, "prepack_backend": backend}
    p = batch.plan
    masked = backend not in VARLEN_BACKENDS
    order = p.order[batch.row_ptr[rows.start] : batch.row_ptr[rows.stop]]
    if masked:
        ids = batch.input_ids[rows].to(device)
        pos = batch.position_ids[rows].to(device)
        ends = p.offset[order] + p.lengths[order] - 1
        keep, where = np.unique(ends, return_inverse=True)
        kwargs["prepack_mask_fn"] = functools.lru_cache(maxsize=None)(
            lambda window: batch.attention_mask("bool", window=window, rows=rows).to(device)
        )
    else:
        v = batch.to_varlen(rows)
        ids, pos = v.input_ids[None].to(device), v.position_ids[None].to(device)
        cu = v.cu_seqlens.to(device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=v.max_seqlen, max_length_k=v.max_seqlen)
        keep = v.cu_seqlens[1:].numpy().astype(np.int64) - 1
        where = np.arange(len(keep))
    # Only the last token of each prompt needs logits: skip the LM head everywhere else.
    kwargs["logits_to_keep"] = torch.from_numpy(keep).to(device) if want_logits else 1
    out = model(input_ids=ids, position_ids=pos, **kwargs)
    if not want_logits:
        return captured, None
    row_of = torch.from_numpy(p.row[order] - rows.start).to(device) if masked else torch.zeros(len(order), dtype=torch.long, device=device)
    return captured, out.logits[row_of, torch.from_numpy(where).to(device)]


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(cls) -> str:
    import inspect

    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x; use whichever this model takes."""
    return _cache_kwarg_for(type(model))
