"""Step 4 of the data flow: one packed forward pass over many prompts.

``prefill`` plans and packs the prompts, runs the model once per micro-batch
with prepack's attention registered through ``AttentionInterface``, and keeps
what each request needs: its last-token logits and its own keys and values.
The packed forward gets a recording cache (:func:`prepack.kvcache.recording_cache`)
that keeps what the model writes to its cache, layer by layer, and stores nothing:
a transformers cache would copy the whole stream once more, and a sliding-window
cache would drop tokens of the stream that other requests still need. Recording
at the cache, not in attention, keeps exactly what the model caches, also where
that is not what attention sees (MLA caches compressed latents). They are gathered
into per-request layouts only on demand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import kvcache, layout
from .attention import SINK_BACKENDS, resolve_backend
from .hf import attention_needs, cache_kwarg, check_model, model_device, packed_forward
from .inputs import Prompts, as_prompts
from .packing import PackedBatch, pack_plan
from .support import UnsupportedModelError, has_attention_sinks
from .planner import check_capacity, plan

# Backends that prefill lays out as rows of ``capacity`` tokens, each row under a dense (C, C)
# block-diagonal mask (the prepacking paper's layout). Every other backend gets one varlen
# stream of at most ``token_budget`` tokens per forward.
ROW_BACKENDS = ("sdpa_masked",)


@dataclass(frozen=True, eq=False)
class PrefillResult:
    """What a packed prefill leaves for each of N requests.

    The keys and values stay where the forwards left them, one chunk per forward, so that
    holding them costs their size once; the cache layouts below gather from them on demand.

    Attributes:
        logits: (N, V) last-token logits, in request order (None when not asked for).
        lengths: (N,) int64 tokens per request, on the model's device.
        batch: the :class:`~prepack.packing.PackedBatch` that was run.
        backend: the attention backend that ran (``"auto"`` resolved).
        chunks: per forward, per layer (keys, values), each (B, H_kv, L, D): what the model caches
            (RoPE applied; compressed latents for MLA).
        chunk: (N,) int64 numpy, the forward (index into ``chunks``) that holds each request.
        starts: (N,) int64 numpy, where each request's first token sits in its chunk's
            flattened (B * L) token axis.
        config: the model config, for building caches with the right layer types.
    """

    logits: torch.Tensor | None
    lengths: torch.Tensor
    batch: PackedBatch
    backend: str
    chunks: list
    chunk: np.ndarray
    starts: np.ndarray
    config: object

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        return self.lengths.cpu().numpy()

    def request_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of request ``i``, each (1, H_kv, lengths[i], D): views, no copy."""
        layers = self.chunks[int(self.chunk[i])] if len(self.chunks) else []
        seq_len = layers[0][0].shape[2] if layers else 1
        b, l = divmod(int(self.starts[i]), seq_len)
        n = int(self._lengths[i])
        return [(k[b : b + 1, :, l : l + n], v[b : b + 1, :, l : l + n]) for k, v in layers]

    @functools.cached_property
    def dynamic_caches(self) -> list:
        """One transformers ``DynamicCache`` per request, holding a copy of exactly its prompt's keys and values."""
        return [kvcache.build_dynamic_cache(self.config, self.request_kv(i)) for i in range(self.num_requests)]

    def _pieces(self, rows: np.ndarray, dst: np.ndarray) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per chunk: (chunk, src, dst) token indices moving ``rows``' tokens to ``dst`` (request after request)."""
        lengths, device = self._lengths[rows], self.lengths.device
        src = layout.ranges(self.starts[rows], lengths)
        owner = np.repeat(self.chunk[rows], lengths)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return [(int(c), as_t(src[owner == c]), as_t(dst[owner == c])) for c in np.unique(owner)]

    def left_padded_cache(self, pad_to: int | None = None, *, rows: Sequence[int] | np.ndarray | None = None):
        """One batched ``DynamicCache`` for ``model.generate``, left-padded to the longest prompt.

        Args:
            pad_to: cache length (default: the longest prompt).
            rows: (M,) the request each cache row holds (default: every request once, in
                order). Repeats give several rows the same prompt, e.g. for several samples
                per prompt, without prefilling it twice or copying a cache.

        Returns:
            ``(cache, attention_mask)``: a ``DynamicCache`` whose layers are
            (M, H_kv, pad_to, D), and an (M, pad_to) int64 mask, 1 on real tokens.
        """
        pad_to = self._pad_to(pad_to)
        rows = np.arange(self.num_requests) if rows is None else np.asarray(rows, np.int64)
        dst = kvcache.padded_targets(self._lengths[rows], pad_to, left=True)
        mask = torch.zeros(len(rows), pad_to, dtype=torch.long, device=self.lengths.device)
        mask.view(-1)[torch.from_numpy(dst).to(mask.device)] = 1
        cache = kvcache.left_padded_cache(self.config, self.chunks, self._pieces(rows, dst), len(rows), pad_to)
        return cache, mask

    def flash_kvcache(self, extra: int = 0, *, padding: str = "right") -> kvcache.FlashKVCache:
        """Caches in ``flash_attn_with_kvcache`` layout, with room for ``extra`` decoded tokens.

        Args:
            extra: free slots after the longest prompt, for the tokens to decode.
            padding: ``"right"`` (prompts start at 0, ``cache_seqlens`` = lengths) or
                ``"left"`` (prompts end together; pass ``cache_leftpad``, flash-attn >= 2.6.1).

        Returns:
            A :class:`~prepack.kvcache.FlashKVCache`: per layer (N, longest + extra, H_kv, D)
            keys and values, ``cache_seqlens`` (N,) int32 and, for ``"left"``, ``cache_leftpad`` (N,) int32.
        """
        if padding not in ("right", "left"):
            raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
        if not isinstance(extra, int) or extra < 0:
            raise ValueError(f"extra must be an integer >= 0, got {extra!r}")
        n, longest = self.num_requests, self._pad_to(None)
        left = padding == "left"
        dst = kvcache.padded_targets(self._lengths, longest, left=left, row_len=longest + extra)
        pieces = self._pieces(np.arange(n), dst)
        num_layers = len(self.chunks[0]) if self.chunks else 0
        ks = [kvcache.gather_padded([c[j][0] for c in self.chunks], pieces, n, longest + extra) for j in range(num_layers)]
        vs = [kvcache.gather_padded([c[j][1] for c in self.chunks], pieces, n, longest + extra) for j in range(num_layers)]
        lengths = self.lengths.to(torch.int32)
        if left:
            return kvcache.FlashKVCache(ks, vs, torch.full_like(lengths, longest), longest - lengths)
        return kvcache.FlashKVCache(ks, vs, lengths, None)

    def _pad_to(self, pad_to: int | None) -> int:
        longest = int(self._lengths.max()) if self.num_requests else 0
        if pad_to is None:
            return longest
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
        return pad_to


def prefill(
    model,
    sequences: Sequence,
    *,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    logits: bool = True,
    tokenizer=None,
) -> PrefillResult:
    """Run many prompts through ``model`` in one packed prefill.

    Args:
        model: a decoder-only transformers model whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Mistral, Gemma, ...).
        sequences: N prompts: token-id lists or 1-D tensors, tokenizer output
            (``input_ids`` + ``attention_mask``, left- or right-padded), strings or chat
            conversations with ``tokenizer`` (see :mod:`prepack.inputs`).
        backend: ``"auto"``, ``"flash"``, ``"torch_varlen"``, ``"sdpa_varlen"``, ``"flex"``, ``"sdpa_masked"``
            or ``"reference"``. ``"auto"`` on CUDA in fp16/bf16 is flash-attn if it imports, else PyTorch's
            FlashAttention varlen kernel (``"torch_varlen"``), else ``"sdpa_varlen"``; the choice is
            ``PrefillResult.backend``.
        token_budget: at most this many tokens per forward pass; default
            :func:`default_token_budget` (raised to the longest prompt if that is longer).
        capacity: row length for ``backend="sdpa_masked"`` (default: the longest prompt);
            refused for the other backends, which take no rows.
        logits: compute the last-token logits.
        tokenizer: tokenizes string or chat prompts.

    Returns:
        A :class:`PrefillResult`: ``.logits`` (N, V), ``.dynamic_caches``,
        ``.left_padded_cache()``, ``.flash_kvcache()``.
    """
    prompts = check_prompts(model, sequences, tokenizer=tokenizer)
    return prefill_tokens(model, prompts.tokens, backend=backend, token_budget=token_budget, capacity=capacity, logits=logits)


def check_prompts(model, inputs, *, tokenizer=None) -> Prompts:
    """Normalise prompts (:func:`prepack.inputs.as_prompts`) and validate them against ``model``.

    Errors name the request and the limit: an empty prompt, one longer than the model's
    ``max_position_embeddings``, a token id outside its vocabulary, a tensor on another device.
    """
    check_model(model)
    device = model_device(model)
    if hasattr(inputs, "keys") and "input_ids" in inputs.keys():
        tensors = [("input_ids", inputs["input_ids"])]
    elif isinstance(inputs, (list, tuple)):
        tensors = [(f"request {i}", s) for i, s in enumerate(inputs)]
    else:
        tensors = [("input_ids", inputs)]
    for what, s in tensors:
        if isinstance(s, torch.Tensor) and s.device != device:
            raise ValueError(f"{what} is on {s.device} but the model is on {device}; move it with .to({str(device)!r})")
    prompts = as_prompts(inputs, tokenizer)
    config = model.config.get_text_config(decoder=True)
    max_pos = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    for i, t in enumerate(prompts.tokens):
        if max_pos is not None and len(t) > max_pos:
            raise ValueError(f"request {i} has {len(t)} tokens but the model's max_position_embeddings is {max_pos}")
        if vocab is not None and t.max() >= vocab:
            raise ValueError(f"request {i} has token id {t.max()} but the model's vocab_size is {vocab}")
    return prompts


def default_token_budget(model) -> int:
    """Tokens per forward when the caller sets no ``token_budget``.

    * CPU: 8192. Longer streams are slower, not faster: the activations of a longer forward fall
      out of the caches, and its memory grows with the stream (``benchmarks/bench_token_budget.py``,
      ``docs/prefill.md``).
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


def prefill_tokens(
    model, tokens: Sequence[np.ndarray], *, backend: str, token_budget: int | None, capacity: int | None, logits: bool
) -> PrefillResult:
    """:func:`prefill` on prompts :func:`check_prompts` accepted; zero-length ones get an empty cache and no logits."""
    device, dtype = model_device(model), next(model.parameters()).dtype
    name = resolve_backend(backend, device=device, dtype=dtype, **attention_needs(model))
    if backend == "auto" and name not in SINK_BACKENDS and has_attention_sinks(model):
        name = "sdpa_varlen"  # the CUDA kernels take no attention sinks
    rows_layout = name in ROW_BACKENDS
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
    batch = pack_plan(plan(real_lengths, capacity if rows_layout else token_budget), [tokens[i] for i in real])
    p = batch.plan
    # a forward takes as many rows as the budget allows; a varlen row is already one budget's worth
    per_call = max(1, token_budget // p.capacity) if rows_layout else 1
    calls = [slice(a, min(a + per_call, p.num_rows)) for a in range(0, p.num_rows, per_call)]

    chunks, last_logits = [], []
    with torch.no_grad(), packed_forward(model):
        for rows in calls:
            kv, out = _forward(model, batch, rows, name, device, logits)
            chunks.append(kv)
            last_logits.append(out)
    # which forward holds each request, and where it starts in that forward's flattened (B * L) tokens
    chunk, starts = np.zeros(len(tokens), np.int64), np.zeros(len(tokens), np.int64)
    first_row = np.array([rows.start for rows in calls], np.int64)
    chunk[real] = np.searchsorted(first_row, p.row, side="right") - 1
    if rows_layout:
        starts[real] = (p.row - first_row[chunk[real]]) * p.capacity + p.offset
    else:  # one row per forward: the request's start in that row's varlen stream
        starts[real] = batch.stream_starts - layout.starts(p.row_lengths)[p.row]
    out_logits = None
    if logits and len(real):
        packed = torch.cat(last_logits)  # in packed order
        out_logits = packed.new_zeros(len(tokens), packed.shape[-1])
        out_logits[torch.from_numpy(real[p.order]).to(device)] = packed
    return PrefillResult(
        logits=out_logits, lengths=torch.from_numpy(lengths).to(device), batch=batch, backend=name,
        chunks=chunks, chunk=chunk, starts=starts, config=model.config,
    )


def _forward(model, batch: PackedBatch, rows: slice, backend: str, device, want_logits: bool):
    """One forward pass over ``rows`` of ``batch``.

    Returns:
        per layer (keys, values) as the model caches them, and the (n, V) last-token
        logits of the call's n requests in packed order (None without ``want_logits``).
    """
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer_idx -> what the model caches
    cache = kvcache.recording_cache(model.config, records)
    kwargs = {"use_cache": True, cache_kwarg(model): cache, "prepack_backend": backend}
    p = batch.plan
    order = p.order[batch.row_ptr[rows.start] : batch.row_ptr[rows.stop]]
    if backend in ROW_BACKENDS:
        ids, pos = batch.input_ids[rows], batch.position_ids[rows]
        first = (p.row[order] - rows.start) * p.capacity + p.offset[order]
        kwargs["prepack_row_mask"] = functools.lru_cache(maxsize=None)(
            lambda window, chunk: batch.attention_mask("bool", window=window, chunk=chunk, rows=rows).to(device)
        )
    else:
        v = batch.to_varlen(rows)
        ids, pos = v.input_ids[None], v.position_ids[None]
        cu = v.cu_seqlens.to(device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=v.max_seqlen, max_length_k=v.max_seqlen)
        first = v.cu_seqlens[:-1].numpy().astype(np.int64)
    # Only the last token of each prompt needs logits: skip the LM head everywhere else.
    seq_len = ids.shape[1]
    last = first + p.lengths[order] - 1  # in the call's flattened (B * L) token axis
    keep, where = np.unique(last % seq_len, return_inverse=True)
    kwargs["logits_to_keep"] = torch.from_numpy(keep).to(device) if want_logits else 1
    out = model(input_ids=ids.to(device), position_ids=pos.to(device), **kwargs)
    if sorted(records) != list(range(len(cache.layers))):
        missing = sorted(set(range(len(cache.layers))) - set(records))
        raise UnsupportedModelError(
            f"{type(model).__name__} wrote no keys and values to its cache for layer(s) {missing} of "
            f"{len(cache.layers)}; prepack builds each request's cache from what the model caches"
        )
    captured = [records[i] for i in range(len(cache.layers))]
    if not want_logits:
        return captured, None
    flat = out.logits.reshape(-1, out.logits.shape[-1])  # (B * len(keep), V)
    return captured, flat[torch.from_numpy(last // seq_len * len(keep) + where).to(device)]
