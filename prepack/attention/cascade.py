"""Attention over a shared prefix held once: each query's softmax split into parts and merged exactly.

A decode-engine request that shares a prompt prefix with others reads its keys from two places in
the :class:`~prepack.executor.kvstore.KVStore`: the prefix's region (held once, read-only) and its own region.
The varlen kernels want each segment's keys contiguous, and copying the prefix in front of every
sharer's keys at every step would move the whole prefix once per sharer per layer. Instead, as in
cascade attention (FlashInfer) and Hydragen, attention is computed per part with its log-sum-exp and
the parts are merged::

    out = sum_i exp(lse_i - lse) * out_i,   lse = logsumexp_i(lse_i)

which is the softmax over the union of the parts' keys, up to float rounding (fp32 here). Every
sharer's queries attend to all of the prefix (it lies wholly before them, so the causal mask
hides none of it): the queries of all sharers of one prefix go through one non-causal call over
the prefix's keys, which reads the prefix once per step instead of once per sharer. Their own keys
are a second (causal, bottom-right aligned) part. Plain softmax attention only: no window, chunk,
soft-cap or sinks (the engine shares no prefix for a model that has any of them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..hf.support import UnsupportedModelError


@dataclass(frozen=True, eq=False)
class SharedParts:
    """Which queries of a step read a shared prefix, and where their keys are (built once per step).

    The sharers' M query tokens are gathered once (``rows``); the parts below address them by their
    position in that gather.

    Attributes:
        rows: (M,) int64, the query-stream tokens of every sharer, in stream order.
        groups: per prefix read this step, ``(start, length, pos)``: the prefix's pool rows
            ``[start, start + length)`` and ``pos`` (m,) int64, the positions in ``rows`` that read it.
        singles: ``(pos, idx, valid)`` for sharers feeding one token: ``pos`` (n,) int64 into ``rows``,
            ``idx`` (n, L) int64 pool rows of their own keys (padded), ``valid`` (n, L) bool.
        spans: per sharer feeding more tokens, ``(at, q_len, k_start, cached)``: its queries are
            ``rows[at : at + q_len]``, its own keys the pool's ``[k_start, k_start + cached + q_len)``,
            of which the last ``q_len`` are the new ones.
        others: whether any query of the step is not merged here (then the base kernel runs too).
        taken: (n,) bool numpy, per key of the step's order, whether its queries are merged here.
    """

    rows: torch.Tensor
    groups: list
    singles: tuple | None
    spans: list
    others: bool
    taken: np.ndarray


def shared_parts(order, q, cached, starts, chains: dict, regions: dict, device, *, split_chunks: bool = False) -> SharedParts | None:
    """The step's :class:`SharedParts`, or None when no query reads a shared prefix (nor is split).

    Args:
        order: the step's region keys in stream order; q, cached, starts: (n,) int64 numpy, per key
            its new tokens, keys cached before the step and first pool row.
        chains: key -> the prefix regions it continues (any number, a tree's path: each is a part of its own);
            regions: prefix key -> (start, length) after the step.
        split_chunks: also split a prompt chunk that continues its own earlier keys into those (all
            visible) and its causal square, merged the same way. On CPU the kernel behind
            ``sdpa_varlen`` takes a bottom-right causal segment through a dense mask (scores
            materialised); the two parts run on PyTorch's fused flash kernel instead.
    """
    q_start = np.concatenate([[0], np.cumsum(q)[:-1]]).astype(np.int64)
    by_prefix: dict = {}
    rows, single_pos, single_idx, spans = [], [], [], []
    at, others = 0, False
    taken = np.zeros(len(order), bool)
    for i, key in enumerate(order):
        if q[i] == 0:
            continue
        chain = chains.get(key, ())
        n = int(q[i])
        if not chain and not (split_chunks and n > 1 and cached[i] > 0):
            others = True
            continue
        taken[i] = True
        rows.append(np.arange(q_start[i], q_start[i] + n))
        for p in chain:
            by_prefix.setdefault(p, []).append(np.arange(at, at + n))
        if n == 1:
            single_pos.append(at)
            single_idx.append(np.arange(starts[i], starts[i] + cached[i] + 1))
        else:
            spans.append((at, n, int(starts[i]), int(cached[i])))
        at += n
    if not rows:
        return None

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    groups = [(*regions[p], tensor(np.concatenate(pos))) for p, pos in by_prefix.items()]
    singles = None
    if single_pos:
        longest = max(len(ix) for ix in single_idx)
        idx = np.zeros((len(single_idx), longest), np.int64)
        valid = np.zeros((len(single_idx), longest), bool)
        for j, ix in enumerate(single_idx):
            idx[j, : len(ix)], valid[j, : len(ix)] = ix, True
            idx[j, len(ix) :] = ix[-1]  # masked slots read any real key
        singles = (tensor(np.asarray(single_pos, np.int64)), tensor(idx), tensor(valid))
    return SharedParts(tensor(np.concatenate(rows)), groups, singles, spans, others, taken)


def cascade_kernel(base, parts: SharedParts, layout):
    """``base`` (a :class:`~prepack.attention.registry.Kernel`) computing the rows ``parts`` takes from their merged parts.

    ``layout``: the :class:`~prepack.executor.call.StepLayout` the base kernel runs for the other rows (the taken
    rows' segments have no keys there). It declares what a merge of parts computes exactly (plain causal
    softmax), so the registry's own check (:meth:`~prepack.attention.registry.Kernel.refusal`) refuses the rest.
    """
    return replace(
        base, fn=functools.partial(_attend, base.fn, parts, layout), softcap=False, sinks=False, window=False,
        fix="a shared prefix's attention is merged from parts for plain causal softmax only: pass share_prefixes=False",
    )


def _attend(
    base_fn, parts: SharedParts, layout, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
) -> torch.Tensor:
    """``flash_attn_varlen_func``'s signature over the pool's keys; sharers' rows merged from their parts.

    Args:
        q: (T, H, D) the step's queries; k, v: (P, H_kv, D) views of the layer's pool.
    """
    # a packed call is refused soft-capping, sinks and windows before this, by cascade_kernel's declaration;
    # this guards a direct call, which must not have them ignored either
    if dropout_p or softcap or sinks is not None or not causal or tuple(window_size) != (-1, -1):
        raise UnsupportedModelError(
            "a shared prefix's attention is merged from parts for plain causal softmax attention only "
            f"(got dropout={dropout_p}, softcap={softcap}, sinks={sinks is not None}, window={tuple(window_size)}); "
            "pass share_prefixes=False"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if parts.others:  # the other rows: the base kernel, under a layout that gives the taken rows no keys
        out = base_fn(q, k, v, *layout.varlen_args(), dropout_p=0.0, softmax_scale=scale, causal=True,
                      window_size=(-1, -1), softcap=0.0)
    else:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
    qs = q.index_select(0, parts.rows)  # (M, H, D) the sharers' queries
    acc = _Merged(len(qs), q.shape[1], v.shape[-1], q.device)
    for start, length, pos in parts.groups:
        acc.add(pos, *prefix_part(qs.index_select(0, pos), k[start : start + length], v[start : start + length], scale))
    if parts.singles is not None:
        pos, idx, valid = parts.singles
        acc.add(pos, *_single_part(qs.index_select(0, pos), k[idx], v[idx], valid, scale))
    for at, q_len, k_start, cached in parts.spans:
        mine = slice(at, at + q_len)
        if cached:
            acc.add(mine, *prefix_part(qs[mine], k[k_start : k_start + cached], v[k_start : k_start + cached], scale))
        new = slice(k_start + cached, k_start + cached + q_len)
        acc.add(mine, *causal_part(qs[mine], k[new], v[new], scale))
    return out.index_copy_(0, parts.rows, acc.out.to(out.dtype))


class _Merged:
    """Running softmax merge of attention parts: (M, H, Dv) float32 output and (M, H) log-sum-exp."""

    def __init__(self, m: int, h: int, dv: int, device):
        self.out = torch.zeros(m, h, dv, device=device)
        self.lse = torch.full((m, h), float("-inf"), device=device)

    def add(self, at, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge one part's (m, H, Dv) ``out`` and (m, H) ``lse`` into the rows ``at`` (a slice or (m,) int64)."""
        if isinstance(at, slice):
            self._merge(at, out, lse)
            return
        old_out, old_lse = self.out.index_select(0, at), self.lse.index_select(0, at)
        new_out, new_lse = merge_parts(old_out, old_lse, out.float(), lse)
        self.out.index_copy_(0, at, new_out)
        self.lse.index_copy_(0, at, new_lse)

    def _merge(self, at: slice, out, lse) -> None:
        self.out[at], self.lse[at] = merge_parts(self.out[at], self.lse[at], out.float(), lse)


def merge_parts(o1, lse1, o2, lse2):
    """Two parts' softmax-weighted outputs over disjoint keys -> the output over their union, and its lse."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num_(0.0)  # a row with no keys yet has lse -inf: weight 0
    return o1 * w1[..., None] + o2 * torch.exp(lse2 - lse)[..., None], lse


def prefix_part(q, k, v, scale):
    """(m, H, D) queries over (P, H_kv, D) keys, all visible: ((m, H, Dv) out, (m, H) float32 lse).

    Grouped-query heads fold into the query axis, so the keys are read once per key head, not repeated.
    """
    m, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    qq = q.view(m, hk, g, d).permute(1, 2, 0, 3).reshape(1, hk, g * m, d)
    o, lse = _lse_attention(qq, k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], scale)
    o = o[0].view(hk, g, m, -1).permute(2, 0, 1, 3).reshape(m, h, -1)
    return o, lse[0].view(hk, g, m).permute(2, 0, 1).reshape(m, h)


def _single_part(q, k, v, valid, scale):
    """(n, H, D) one query each over its own (n, L, H_kv, D) keys where ``valid`` (n, L): (out, lse)."""
    n, h, d = q.shape
    hk = k.shape[2]
    mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    o, lse = _lse_attention(
        q.view(n, hk, h // hk, d), k.transpose(1, 2), v.transpose(1, 2), scale, mask=mask[:, None, None, :]
    )
    return o.reshape(n, h, -1), lse.reshape(n, h)


def causal_part(q, k, v, scale):
    """(s, H, D) queries over the same s tokens' (s, H_kv, D) keys, causal: (out, lse)."""
    s, h, d = q.shape
    g = h // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).transpose(0, 1)[None]
    vv = v.repeat_interleave(g, dim=1).transpose(0, 1)[None]
    o, lse = _lse_attention(q.transpose(0, 1)[None], kk, vv, scale, causal=True)
    return o[0].transpose(0, 1), lse[0].transpose(0, 1)


def _lse_attention(q, k, v, scale, *, mask=None, causal=False):
    """(B, H, Lq, D) x (B, H, Lk, D) -> ((B, H, Lq, Dv) out, (B, H, Lq) float32 log-sum-exp of the scores).

    PyTorch's fused CPU flash kernel where it applies (it returns the log-sum-exp); explicit math elsewhere.
    ``mask``: additive, broadcastable to (B, H, Lq, Lk). ``causal``: top-left aligned (square calls only).
    """
    if q.device.type == "cpu" and k.shape[-1] == v.shape[-1] and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return o, lse.float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse
