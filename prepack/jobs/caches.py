"""Step 6 of the data flow: packed keys/values -> per-request KV caches.

After a packed prefill every layer's keys and values sit in the packed layout,
(B, H_kv, L, D): one flat stream (B = 1) for varlen backends, or R rows of
capacity C for ``sdpa_masked``. Flattening (B, L) into one token axis, request
i's tokens sit at ``layout.ranges(starts, lengths)``. These pure functions gather
them, with one indexing op per layer and tensor, into the layout a decoder wants.
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import NamedTuple

import numpy as np
import torch

from ..planner import layout
from ..hf.support import kv_share_sources


class FlashKVCache(NamedTuple):
    """Per-layer caches in ``flash_attn_with_kvcache`` layout.

    Attributes:
        k_caches, v_caches: one (N, L_pad, H_kv, D) tensor per layer.
        cache_seqlens: (N,) int32, where each request's cache ends.
        cache_leftpad: (N,) int32, where each request's cache starts (left-padded
            layout, flash-attn >= 2.6.1), or None when the layout is right-padded.
    """

    k_caches: list
    v_caches: list
    cache_seqlens: torch.Tensor
    cache_leftpad: torch.Tensor | None


def padded_targets(lengths: np.ndarray, pad_to: int, *, left: bool, row_len: int | None = None) -> np.ndarray:
    """(T,) int64 indices into an (N * row_len) token axis (``row_len`` defaults to ``pad_to``), request after request.

    Requests start at 0 (``left=False``) or end at ``pad_to`` (``left=True``);
    slots from ``pad_to`` to ``row_len`` stay free for decoded tokens.
    """
    lengths = np.asarray(lengths, np.int64)
    row_start = np.arange(len(lengths), dtype=np.int64) * (row_len or pad_to) + ((pad_to - lengths) if left else 0)
    return layout.ranges(row_start, lengths)


def chunk_pieces(chunk: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dst: np.ndarray, device) -> list:
    """Per chunk, (chunk, src, dst): the gather that moves requests' tokens out of a run's chunks.

    Args:
        chunk: (n,) int64, the chunk (forward) that holds each request.
        starts: (n,) int64, where each request's first token sits in its chunk's flattened token axis.
        lengths: (n,) int64, tokens per request.
        dst: (sum(lengths),) int64, where each token goes, request after request.

    Returns:
        ``[(c, src, dst_c), ...]`` with ``src`` / ``dst_c`` (k,) int64 tensors on ``device``.
    """
    src = layout.ranges(starts, lengths)
    owner = np.repeat(chunk, lengths)

    def as_tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return [(int(c), as_tensor(src[owner == c]), as_tensor(dst[owner == c])) for c in np.unique(owner)]


def gather_padded(chunks: list, pieces: list, n: int, row_len: int) -> torch.Tensor:
    """Scatter packed states into a zero-padded (n, row_len, H, D) tensor, flash-attn's kvcache layout.

    Tokens move as whole (D,) rows through ``index_select`` / ``index_copy_`` on
    a token axis, which for a flat stream (B = 1) is a view of the chunk.

    Args:
        chunks: one packed (B, H, L, D) tensor per forward.
        pieces: (chunk, src, dst) per chunk that holds requests: ``src`` (T_c,) int64 into that
            chunk's B * L token axis, ``dst`` (T_c,) int64 into the n * row_len token axis
            (:func:`padded_targets`).
    """
    x0 = chunks[0]
    H, D = x0.shape[1], x0.shape[3]
    out = x0.new_zeros(n * row_len, H, D)
    for c, src, dst in pieces:
        out.index_copy_(0, dst, _tokens(chunks[c], src))
    return out.view(n, row_len, H, D)


def _tokens(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> the (T, H, D) tokens at ``src`` of its flattened B * L token axis."""
    H, D = x.shape[1], x.shape[3]
    return x.transpose(0, 1).reshape(H, -1, D).index_select(1, src).transpose(0, 1)


def left_padded_cache(config, chunks: list, pieces: list, n: int, pad_to: int, copies: dict[int, int] | None = None):
    """A ``DynamicCache`` of (n, H_kv, pad_to, D) layers holding the packed tokens, zeros elsewhere.

    The padded layout is mostly padding, so writing it is what costs. Each layer
    is written once: ``DynamicCache.update`` materialises a broadcast zero into
    the cache's own tensor, which it returns, and the real tokens are copied
    into that tensor in place (for sliding-window layers the kept window is a
    view of it, so it sees them too).

    Args:
        chunks: per forward, per layer (keys, values), each packed (B, H_kv, L, D).
        pieces: (chunk, src, dst) as in :func:`gather_padded`, ``dst`` into the n * pad_to token axis.
        copies: cache layers the model appends in its forward -> the layer each copies (:func:`appended_layers`).
    """
    from transformers import DynamicCache

    cache = _append_copies(DynamicCache(config=config), copies)
    where = [(c, src, dst // pad_to, dst % pad_to) for c, src, dst in pieces]
    for i, kv in enumerate(chunks[0]):
        if _keeps_no_kv(cache.layers[i]):  # a layer reading another's keys (KV sharing): transformers caches none for it
            continue
        zeros = [x.new_zeros(()).expand(n, x.shape[1], pad_to, x.shape[3]) for x in kv]
        for j, full in enumerate(cache.update(*zeros, i)):
            for c, src, rows, cols in where:
                full[rows, :, cols] = _tokens(chunks[c][i][j], src)
    return cache


def own_storage(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a copy when it is a view into a larger tensor (a fused qkv projection, say),
    so that keeping a layer's keys and values does not keep its queries alive too."""
    if x.untyped_storage().nbytes() > x.numel() * x.element_size():
        return x.contiguous() if not x.is_contiguous() else x.clone()
    return x


def recording_cache(config, records: dict):
    """A ``DynamicCache`` for one packed prefill that stores nothing and records what the model caches.

    Each layer's ``update(keys, values)`` puts them in ``records[layer_idx]`` and hands them back
    unchanged, so attention sees the whole packed stream (no window drops tokens another request
    needs) and nothing is copied. What is recorded is exactly what the model would keep in its own
    cache: RoPE-applied keys for most models, the compressed latents for MLA (DeepSeek), whose
    attention sees keys and values of other shapes. Every layer reports 0 cached tokens, as a fresh
    cache does before a prefill.

    Args:
        records: filled with layer_idx -> (keys, values), each (B, H_kv, L, D).
    """
    from ..mixers.states import new_cache

    cache = new_cache(config)  # the model's own class: MiniMax's model refuses any other
    readers: dict[int, list[int]] = {}  # a layer -> the later layers that read its keys and values (KV sharing)
    for reader, source in kv_share_sources(config).items():
        readers.setdefault(source, []).append(reader)
    # a cache class made without the config (MiniMaxCache) adds its layers on first use: one per decoder layer here
    layers = len(cache.layers) or config.get_text_config(decoder=True).num_hidden_layers
    cache.layers = [_recording_layer_class()(i, records, readers.get(i, ())) for i in range(layers)]
    for layer in cache.layers:
        layer.cache = weakref.ref(cache)
    return cache


def appended_layers(cache) -> dict[int, int]:
    """Cache layers the model appended to a :func:`recording_cache` during its forward -> the layer each copies.

    Dory's recurrent loops (``recurrent_kv_cache_mode="per_loop"``) append ``copy.deepcopy`` of their layers' cache
    layers and write each later loop's keys there; the per-request caches get the same copies
    (:func:`build_dynamic_cache`'s ``copies``), so ``model.generate`` finds the layout it made itself.
    """
    return {i: layer.origin for i, layer in enumerate(cache.layers) if getattr(layer, "origin", None) is not None}


def _append_copies(cache, copies: dict[int, int] | None):
    """Append to ``cache`` (a fresh ``DynamicCache``) a deep copy of layer ``copies[i]`` at each index ``i``, in order."""
    for i in sorted(copies or {}):
        if i != len(cache.layers):
            raise ValueError(f"cache layer {i} copies layer {copies[i]}, but the cache has {len(cache.layers)} layers")
        cache.layers.append(copy.deepcopy(cache.layers[copies[i]]))
    return cache


@functools.lru_cache(maxsize=1)
def _recording_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RecordingLayer(DynamicLayer):
        def __init__(self, layer_idx: int, records: dict, readers=()):
            super().__init__()
            self.layer_idx, self.records, self.readers = layer_idx, records, tuple(readers)

        origin = None  # set on a copy the model appended (appended_layers): the layer it copies
        cache = None  # weakref to the recording cache holding this layer

        def __deepcopy__(self, memo):
            # a copy the model appends to the cache (Dory's per-loop layers): it records the same way, under the
            # index it holds in the cache (found at its first update), and remembers the layer it copies
            twin = RecordingLayer(None, self.records)
            twin.origin, twin.cache = self.layer_idx if self.origin is None else self.origin, self.cache
            return twin

        def update(self, key_states, value_states, *args, **kwargs):
            if self.layer_idx is None:
                self.layer_idx = next(i for i, layer in enumerate(self.cache().layers) if layer is self)
            kept = (own_storage(key_states), own_storage(value_states))
            for i in (self.layer_idx, *self.readers):  # layers reading this one's keys and values hold the same tensors
                self.records[i] = kept
            return key_states, value_states

    return RecordingLayer


def build_dynamic_cache(config, layers: list[tuple[torch.Tensor, torch.Tensor]], copies: dict[int, int] | None = None):
    """A transformers ``DynamicCache`` for ``config`` holding (B, H_kv, L, D) keys/values per layer.

    Built through ``DynamicCache.update`` so that sliding-window layers keep
    only their window, exactly as transformers would after its own prefill.
    ``copies``: cache layers the model appends in its forward -> the layer each copies (:func:`appended_layers`).
    """
    from transformers import DynamicCache

    cache = _append_copies(DynamicCache(config=config), copies)
    for i, (k, v) in enumerate(layers):
        if not _keeps_no_kv(cache.layers[i]):  # a layer reading another's keys (KV sharing) caches none of its own
            cache.update(k, v, i)
    return cache


def _keeps_no_kv(layer) -> bool:
    """Whether a cache layer holds no keys by design: transformers' ``DummyLayer`` (a layer that reads another
    layer's keys and values, :func:`prepack.support.kv_share_sources`)."""
    from transformers.cache_utils import DummyLayer

    return isinstance(layer, DummyLayer)
