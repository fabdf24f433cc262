"""Which key each query of a packed stream may see: windows and dense masks (a leaf module).

Every attention backend (:mod:`prepack.attention` on any device, :mod:`prepack.attention.cuda` on CUDA)
and :class:`~prepack.data.batch.PackedBatch` read their masks and windows from here, so that
``window_size`` means what flash-attn's kernel means everywhere. Dense masks are O(L^2) and
built only where a backend asks for one.
"""

from __future__ import annotations

import torch


def flash_window(window_size, causal: bool, max_seqlen_k: int | None) -> tuple[int, int]:
    """``window_size`` as flash-attn's kernel applies it.

    flash-attn drops a window side that reaches ``max_seqlen_k`` or beyond
    (``flash_api.cpp``: ``if (window_size_left >= seqlen_k) window_size_left = -1``) and forces
    the right side to 0 under ``causal``. Every backend normalises the same way, so that they
    all mean the same thing for the same arguments.
    """
    left, right = (int(w) for w in window_size)
    if max_seqlen_k is not None:
        left = -1 if left >= max_seqlen_k else left
        right = -1 if right >= max_seqlen_k else right
    return (max(left, -1), 0 if causal else max(right, -1))


def window_allows(delta, window_size):
    """Whether a key at ``delta`` = key index - query index (bottom-right aligned) is visible.

    ``window_size`` must already be normalised by :func:`flash_window` (``causal`` is then a
    right window of 0). Works on tensors and inside FlexAttention's ``mask_mod``.
    """
    left, right = window_size
    ok = delta == delta  # all True, same type as delta
    if right >= 0:
        ok = ok & (delta <= right)
    if left >= 0:
        ok = ok & (delta >= -left)
    return ok


def document_mask(doc_q, idx_q, doc_k, idx_k, window_size) -> torch.Tensor:
    """The one dense-mask builder: (..., Lq, Lk) bool, True where a query may see a key.

    Args:
        doc_q, doc_k: (..., Lq), (..., Lk) int, the segment of each query / key; -1 (padding) sees nothing.
        idx_q, idx_k: (..., Lq), (..., Lk) int, positions within the segment, with queries counted so that
            the segment's last query and last key line up (flash-attn's bottom-right alignment).
        window_size: normalised by :func:`flash_window`.
    """
    same = (doc_q[..., :, None] == doc_k[..., None, :]) & (doc_q[..., :, None] >= 0)
    return same & window_allows(idx_k[..., None, :] - idx_q[..., :, None], window_size)


def causal_segment_mask(lq: int, lk: int, window_size, device) -> torch.Tensor | None:
    """(lq, lk) bool mask for one segment, or None when SDPA needs none (no window, or plain causal with lq == lk)."""
    left, right = window_size
    if left < 0 and right < 0:
        return None
    if left < 0 and right == 0 and lq == lk:
        return None  # SDPA's is_causal is exactly this
    return segment_mask(lq, lk, window_size, device)


def segment_mask(lq: int, lk: int, window_size, device) -> torch.Tensor:
    """(lq, lk) bool mask of one segment (bottom-right aligned; ``window_size`` normalised)."""
    doc_q = torch.zeros(lq, dtype=torch.long, device=device)
    doc_k = torch.zeros(lk, dtype=torch.long, device=device)
    idx_q = torch.arange(lq, device=device) + (lk - lq)
    return document_mask(doc_q, idx_q, doc_k, torch.arange(lk, device=device), window_size)
