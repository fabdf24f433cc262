"""Step 5 of the data flow: packed keys/values -> per-request KV caches.

After a packed prefill every layer's keys and values sit in the packed layout,
(B, H_kv, L, D): one flat stream (B = 1) for varlen backends, or R rows of
capacity C for masked ones. Token p of request i sits at
``[src_b[i] , :, src_l[i] + p]``. These pure functions gather them, with one
indexing op per layer and tensor, into the layout a decoder wants.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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


def token_sources(src_b: torch.Tensor, src_l: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request starts -> per-token source indices.

    Args:
        src_b, src_l: (N,) int64, where request i starts in the packed (B, L) layout.
        lengths: (N,) int64, tokens per request (0 allowed).

    Returns:
        (T,) int64 batch and position indices, request after request.
    """
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(first, lengths)
    return torch.repeat_interleave(src_b, lengths), torch.repeat_interleave(src_l, lengths) + within


def padded_targets(lengths: torch.Tensor, pad_to: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row, position) in an (N, pad_to) layout, left- or right-padded; request after request."""
    n = len(lengths)
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(first, lengths)
    rows = torch.repeat_interleave(torch.arange(n, device=lengths.device), lengths)
    if left:
        within = within + torch.repeat_interleave(pad_to - lengths, lengths)
    return rows, within


def gather_padded(
    x: torch.Tensor, src: tuple[torch.Tensor, torch.Tensor], dst: tuple[torch.Tensor, torch.Tensor],
    n: int, pad_to: int, *, heads_first: bool = True,
) -> torch.Tensor:
    """Scatter packed (B, H, L, D) states into a zero-padded per-request tensor.

    Returns:
        (n, H, pad_to, D) if ``heads_first`` (transformers' cache layout), else
        (n, pad_to, H, D) (flash-attn's kvcache layout).
    """
    H, D = x.shape[1], x.shape[3]
    shape = (n, H, pad_to, D) if heads_first else (n, pad_to, H, D)
    out = x.new_zeros(shape)
    tokens = x[src[0], :, src[1]]  # (T, H, D)
    if heads_first:
        out[dst[0], :, dst[1]] = tokens
    else:
        out[dst[0], dst[1]] = tokens
    return out


def build_dynamic_cache(config, layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers ``DynamicCache`` for ``config`` holding (B, H_kv, L, D) keys/values per layer.

    Built through ``DynamicCache.update`` so that sliding-window layers keep
    only their window, exactly as transformers would after its own prefill.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache
