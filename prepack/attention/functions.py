"""Step 3 of the data flow: attention over a packed stream.

Every backend has the signature of flash-attn's ``flash_attn_varlen_func``::

    backend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1),
            softcap=0.0, sinks=None) -> out

with ``q: (total_q, H, D)``, ``k, v: (total_k, H_kv, D)`` (``H`` a multiple of
``H_kv``: grouped-query attention), ``cu_seqlens_*: (n + 1,) int32`` and
``out: (total_q, H, D)``. Semantics follow flash-attn: with ``causal`` and
``seqlen_q != seqlen_k`` the mask is aligned to the bottom right, and
``window_size=(left, right)`` lets query i see keys j with
``i - left <= j <= i + right`` (-1 means unbounded; a side of ``max_seqlen_k`` or
more is unbounded too, as in flash-attn's kernel). A query that sees no key
(more queries than keys under ``causal``, or a window) gives 0, never NaN.
Values may have a head dim of their own: ``v: (total_k, H_kv, D_v)`` gives
``out: (total_q, H, D_v)``. ``sinks: (H,)`` are attention sinks (gpt-oss): one learned
logit per head that joins every query's softmax denominator and attends to nothing,
as in flash-attn's ``attention_ref(..., learnable_sink=...)``; the CPU backends take
them, the CUDA kernels (``flash``, ``torch_varlen``) do not.

Backends:
    ``flash``        flash-attn's kernel (CUDA, fp16/bf16; in :mod:`prepack.attention.cuda`).
    ``torch_varlen`` PyTorch's FlashAttention varlen kernel, ``varlen_attn`` (CUDA, fp16/bf16, torch >= 2.10;
                     in :mod:`prepack.attention.cuda`).
    ``sdpa_varlen``  torch SDPA once per segment: O(sum l_i^2), no mask for the whole stream.
    ``sdpa_masked``  one SDPA call with a dense block-diagonal mask (the prepacking paper's method).
    ``flex``         FlexAttention with a document ``BlockMask``.
    ``reference``    explicit float64 math per segment; slow, for tests.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .cascade import causal_part, merge_parts, prefix_part
from .masks import causal_segment_mask, document_mask, flash_window, segment_mask, window_allows

Backend = Callable[..., torch.Tensor]


def _segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Yield (q_start, q_end, k_start, k_end) per segment, with one host sync for the whole stream."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq) - 1} segments but cu_seqlens_k has {len(ck) - 1}")
    return zip(cq[:-1], cq[1:], ck[:-1], ck[1:])


def _check_gqa(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, which is not a multiple of the {k.shape[1]} key/value heads")


def _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size):
    """Checks shared by every backend; returns (scale, normalised window)."""
    _check_gqa(q, k)
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; tokens and heads must match")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(
            f"cu_seqlens_q has {len(cu_seqlens_q) - 1} segments but cu_seqlens_k has {len(cu_seqlens_k) - 1}"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if len(cu_seqlens_k) > 1 else 0
    return scale, flash_window(window_size, causal, max_seqlen_k)


def _math_attention(q, k, v, mask, scale: float, softcap: float, dropout_p: float = 0.0, sinks=None):
    """Explicit attention for (B, H, Lq, D) x (B, H_kv, Lk, D); used where SDPA cannot apply softcap or sinks.

    ``sinks: (H,)`` adds ``exp(sink)`` to each row's softmax denominator (flash-attn's
    ``learnable_sink``). A query with no visible key gives 0, as in flash-attn.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        # the sink is one more logit per head, with no value: it only takes probability mass
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = torch.nan_to_num(probs)  # rows with no visible key: softmax of all -inf is NaN; flash-attn gives 0
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def _sdpa(q, k, v, mask, *, scale: float, softcap: float, dropout_p: float, causal: bool = False, sinks=None):
    """(B, H, Lq, D) attention under a bool mask (or plain causal), grouped-query heads; math for softcap and sinks.

    Queries whose mask row is empty give 0 (flash-attn's convention), never NaN.
    """
    if softcap > 0 or sinks is not None:
        if mask is None and causal:
            mask = segment_mask(q.shape[-2], k.shape[-2], (-1, 0), q.device)
        return _math_attention(q, k, v, mask, scale, softcap, dropout_p, sinks)
    if k.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    empty = None
    if mask is not None:
        empty = ~mask.any(-1, keepdim=True)
        if empty.any():
            mask = mask | empty  # any finite softmax; those outputs are zeroed below
        else:
            empty = None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out if empty is None else out.masked_fill(empty, 0.0)


def sdpa_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
) -> torch.Tensor:
    """Torch SDPA on each segment separately: O(sum l_i^2) work, no (T, T) mask. Any device and dtype.

    Segments of one query each (decode steps): on CPU one fused call each on its keys in place,
    elsewhere batched under a key mask (:func:`_single_queries`).
    """
    scale, window = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    masks: dict[tuple[int, int], torch.Tensor | None] = {}
    singles = []
    for qs, qe, ks, ke in _segments(cu_seqlens_q, cu_seqlens_k):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        if lq == 1 and lk > 0:
            singles.append((qs, ks, lk))
            continue
        if lk > lq and lq * lk >= _SPLIT_AT and window == (-1, 0) and softcap == 0 and sinks is None and not dropout_p and q.device.type == "cpu":
            out[qs:qe] = _continued_causal(q[qs:qe], k[ks:ke], v[ks:ke], scale)
            continue
        if (lq, lk) not in masks:
            masks[(lq, lk)] = causal_segment_mask(lq, lk, window, q.device)
        mask = masks[(lq, lk)]
        o = _sdpa(
            q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None], mask,
            causal=mask is None and window[1] == 0, scale=scale, softcap=softcap, dropout_p=dropout_p, sinks=sinks,
        )
        out[qs:qe] = o[0].transpose(0, 1)
    if singles:
        _single_queries(out, q, k, v, singles, window, scale=scale, softcap=softcap, dropout_p=dropout_p, sinks=sinks)
    return out


# From this many (query, key) pairs on, a segment that continues earlier keys skips the (lq, lk) mask
# (_continued_causal); below it the mask is small and one masked SDPA call is the quicker of the two.
_SPLIT_AT = 1 << 22


def _continued_causal(q, k, v, scale: float) -> torch.Tensor:
    """One segment whose lq queries continue earlier keys (lk > lq, plain causal), without an (lq, lk) mask.

    The queries see every earlier key and the new keys causally. A bottom-right mask would send SDPA
    down its masked path, which turns the mask into an (lq, lk) float bias and runs slower: for a
    2,048-token chunk of a 16,384-token prompt that bias alone is 128 MiB per layer. Instead the two key
    ranges run as two mask-free calls (earlier keys: all visible; new keys: causal, square) merged by their
    log-sum-exps, the decode engine's cascade parts (:mod:`prepack.attention.cascade`).
    q: (lq, H, D); k, v: (lk, H_kv, D[_v]) -> (lq, H, D_v).
    """
    earlier = k.shape[0] - q.shape[0]
    o1, l1 = prefix_part(q, k[:earlier], v[:earlier], scale)
    o2, l2 = causal_part(q, k[earlier:], v[earlier:], scale)
    return merge_parts(o1.float(), l1, o2.float(), l2)[0].to(q.dtype)


def _single_queries(out, q, k, v, singles, window, *, scale, softcap, dropout_p, sinks) -> None:
    """Segments of one query each, (q_start, k_start, k_len), written into ``out``.

    The query is the segment's last token (bottom-right alignment), so it sees key j of its segment iff
    ``k_len - 1 - j`` is inside the window's left side (a right side is moot: no key comes after it).
    On CPU with plain softmax, one fused call per segment on its keys in place (:func:`_single_views`).
    Elsewhere (and with softcap, sinks or dropout) batched SDPA calls: segments batched by key length,
    each batch padded to its longest (at most twice its shortest), so one long request does not pad
    every other one's keys to its length.
    """
    if q.device.type == "cpu" and softcap == 0 and sinks is None and not dropout_p:
        _single_views(out, q, k, v, singles, window, scale)
        return
    singles = sorted(singles, key=lambda s: s[2])
    first = 0
    for i in range(1, len(singles) + 1):
        if i == len(singles) or singles[i][2] > 2 * singles[first][2]:
            _single_batch(out, q, k, v, singles[first:i], window, scale=scale, softcap=softcap,
                          dropout_p=dropout_p, sinks=sinks)
            first = i


def _single_views(out, q, k, v, singles, window, scale: float) -> None:
    """CPU: each one-query segment attends to its own keys where they lie, one fused SDPA call per segment.

    No key is gathered or padded: the keys are a view of the stream. Grouped-query heads need no
    repeat either: the G query heads of one key/value head are that head's G queries, (1, H_kv, G, D),
    all seeing every key (a single query at the bottom right sees its whole segment, or the last
    ``window[0] + 1`` keys under a window). Gathering the segments into a padded batch instead copies
    every key per layer and step and sends SDPA down its masked path, several times slower on CPU.
    """
    groups = q.unflatten(1, (k.shape[1], -1))  # (T, H_kv, G, D)
    keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H_kv, Tk, D) views
    for qs, ks, lk in singles:
        first = ks if window[0] < 0 else max(ks, ks + lk - 1 - window[0])
        o = F.scaled_dot_product_attention(groups[qs][None], keys[:, :, first:ks + lk], values[:, :, first:ks + lk], scale=scale)
        out[qs] = o[0].flatten(0, 1)


def _single_batch(out, q, k, v, singles, window, *, scale, softcap, dropout_p, sinks) -> None:
    qs, ks, lk = (torch.tensor(c, device=q.device) for c in zip(*singles, strict=True))
    longest = int(lk.max())
    j = torch.arange(longest, device=q.device)
    visible = j[None, :] < lk[:, None]
    if window[0] >= 0:
        visible &= j[None, :] >= (lk[:, None] - 1 - window[0])
    idx = (ks[:, None] + j[None, :]).clamp_(max=k.shape[0] - 1)  # (n, longest); masked slots read any real key
    keys, values = k[idx].transpose(1, 2), v[idx].transpose(1, 2)  # (n, H_kv, longest, D)
    o = _sdpa(
        q[qs][:, :, None], keys, values, visible[:, None, None, :], scale=scale, softcap=softcap,
        dropout_p=dropout_p, sinks=sinks,
    )
    out[qs] = o[:, :, 0]


def varlen_mask(cu_seqlens_q, cu_seqlens_k, *, causal=True, window_size=(-1, -1), device=None) -> torch.Tensor:
    """The dense (total_q, total_k) block-diagonal bool mask that a varlen call implies. O(T^2) memory: for tests."""
    doc_q, idx_q = segment_index(cu_seqlens_q, cu_seqlens_k, device)
    doc_k, idx_k = segment_index(cu_seqlens_k, cu_seqlens_k, device)
    max_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if len(cu_seqlens_k) > 1 else 0
    return document_mask(doc_q, idx_q, doc_k, idx_k, flash_window(window_size, causal, max_k))


def segment_index(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, device=None):
    """Per token of a varlen stream: its segment and its bottom-right-aligned index.

    Returns:
        doc: (total,) int64, the segment of each token.
        idx: (total,) int64, its index within the segment, shifted by ``len_k - len`` so that the
            segment's last token lines up with the segment's last key (pass ``cu_seqlens_k`` for keys).
    """
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    cu_k = cu_seqlens_k.to(device=device, dtype=torch.long)
    total = int(cu[-1])
    doc = torch.searchsorted(cu, torch.arange(total, device=device), right=True) - 1
    shift = (cu_k[1:] - cu_k[:-1]) - (cu[1:] - cu[:-1])
    return doc, torch.arange(total, device=device) - cu[:-1][doc] + shift[doc]


def sdpa_masked(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
) -> torch.Tensor:
    """One SDPA call over the whole stream with a dense block-diagonal mask (the prepacking paper's method)."""
    scale, window = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size)
    doc_q, idx_q = segment_index(cu_seqlens_q, cu_seqlens_k, q.device)
    doc_k, idx_k = segment_index(cu_seqlens_k, cu_seqlens_k, q.device)
    out = dense_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        document_mask(doc_q, idx_q, doc_k, idx_k, window), scale=scale, softcap=softcap, dropout_p=dropout_p,
        sinks=sinks,
    )
    return out[0].transpose(0, 1).contiguous()


def dense_attention(
    q, k, v, mask, *, scale: float, softcap: float = 0.0, dropout_p: float = 0.0, sinks=None
) -> torch.Tensor:
    """(B, H, L, D) attention under an explicit bool mask (B or 1, 1, L, L): the masked-backend kernel.

    ``sinks``: (H,) attention-sink logits, or None.
    """
    return _sdpa(q, k, v, mask, scale=scale, softcap=softcap, dropout_p=dropout_p, sinks=sinks)


def flex(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
) -> torch.Tensor:
    """FlexAttention with a document ``BlockMask`` built from ``cu_seqlens``.

    Compiled on CUDA. On CPU it runs flex's eager path, which is exact but
    materialises the scores, so it is here for completeness, not speed.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout_p:
        raise ValueError("the flex backend does not support dropout")
    scale, window = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size)
    dev = q.device
    doc_q, idx_q = segment_index(cu_seqlens_q, cu_seqlens_k, dev)
    doc_k, idx_k = segment_index(cu_seqlens_k, cu_seqlens_k, dev)
    tq, tk = q.shape[0], k.shape[0]
    if tq == 0 or tk == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    def mask_mod(b, h, qi, ki):
        return (doc_q[qi] == doc_k[ki]) & window_allows(idx_k[ki] - idx_q[qi], window)

    score_mod = None
    if softcap > 0:
        def score_mod(score, b, h, qi, ki):
            return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, None, None, tq, tk, device=dev)
    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if sinks is not None:
        kwargs["return_aux"] = _lse_request()
    out = None
    if dev.type == "cuda":
        try:
            out = _compiled_flex()(*args, **kwargs)
        except Exception as e:  # inductor has no kernel for some dtype/shape combinations (e.g. fp32 on torch 2.11)
            warnings.warn(f"compiled flex_attention failed ({type(e).__name__}); using its eager path", stacklevel=2)
    if out is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(*args, **kwargs)
    if sinks is not None:
        # a sink only enlarges the denominator: rescale by sum / (sum + exp(sink)) = sigmoid(lse - sink)
        out, aux = out
        lse = aux.lse if hasattr(aux, "lse") else aux
        out = out * torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))[..., None].to(out.dtype)
    return out[0].transpose(0, 1).contiguous()


def _lse_request():
    from torch.nn.attention.flex_attention import AuxRequest

    return AuxRequest(lse=True)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
) -> torch.Tensor:
    """Plain float64 math per segment, written for clarity. Slow; the oracle for the tests."""
    if dropout_p:
        raise ValueError("the reference backend does not support dropout")
    scale, window = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for qs, qe, ks, ke in _segments(cu_seqlens_q, cu_seqlens_k):
        qq, kk, vv = (x.double().transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        mask = segment_mask(qe - qs, ke - ks, window, q.device)
        sink = None if sinks is None else sinks.double()
        out[qs:qe] = _math_attention(qq, kk, vv, mask, scale, softcap, sinks=sink)[0].transpose(0, 1).to(q.dtype)
    return out
