"""flash-attn's own test oracle, ported to plain torch (no einops, no CUDA).

``construct_local_mask`` and ``attention_ref`` follow ``tests/test_flash_attn.py`` of
Dao-AILab/flash-attention (BSD-3-Clause), restricted to the arguments the varlen tests use
(padding masks, causal, local windows, softcap, and ``learnable_sink``, the attention sinks of
flash-attn 3/4's ``attention_ref`` in ``tests/cute/test_flash_attn.py``). ``generate_random_padding_mask`` and
``unpad`` give the varlen inputs the same way that file's ``generate_qkv`` does.
"""

import math

import torch


def generate_random_padding_mask(max_seqlen, batch_size, generator, mode="random"):
    assert mode in ("full", "random", "third")
    if mode == "full":
        lengths = torch.full((batch_size, 1), max_seqlen, dtype=torch.int32)
    elif mode == "random":
        lengths = torch.randint(max(1, max_seqlen - 20), max_seqlen + 1, (batch_size, 1), generator=generator)
    else:
        lengths = torch.randint(max_seqlen // 3, max_seqlen + 1, (batch_size, 1), generator=generator)
    return torch.arange(max_seqlen)[None, :].expand(batch_size, -1) < lengths


def unpad(x, padding_mask):
    """(B, S, H, D) and a (B, S) bool mask -> (nnz, H, D), cu_seqlens int32, max_seqlen."""
    lengths = padding_mask.sum(-1, dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return x[padding_mask], cu, int(lengths.max())


def pad(x_unpad, padding_mask):
    out = x_unpad.new_zeros(*padding_mask.shape, *x_unpad.shape[1:])
    out[padding_mask] = x_unpad
    return out


def construct_local_mask(seqlen_q, seqlen_k, window_size=(-1, -1), query_padding_mask=None, key_padding_mask=None):
    row_idx = torch.arange(seqlen_q, dtype=torch.long)[:, None]
    col_idx = torch.arange(seqlen_k, dtype=torch.long)
    sk = seqlen_k if key_padding_mask is None else key_padding_mask.sum(-1).view(-1, 1, 1, 1)
    sq = seqlen_q if query_padding_mask is None else query_padding_mask.sum(-1).view(-1, 1, 1, 1)
    if window_size[0] < 0:
        return col_idx > row_idx + sk - sq + window_size[1]
    sk = torch.full_like(col_idx, seqlen_k) if key_padding_mask is None else sk
    return torch.logical_or(
        col_idx > torch.minimum(row_idx + sk - sq + window_size[1], sk),
        col_idx < row_idx + sk - sq - window_size[0],
    )


def attention_ref(
    q, k, v, query_padding_mask=None, key_padding_mask=None, causal=False, window_size=(-1, -1), softcap=0.0,
    learnable_sink=None,
):
    """q: (B, Sq, H, D), k/v: (B, Sk, H_kv, D), learnable_sink: (H,) -> output (B, Sq, H, D), in float64."""
    if causal:
        window_size = (window_size[0], 0)
    dtype_og = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    g = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(q.shape[-1]), k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    local_mask = None
    if window_size[0] >= 0 or window_size[1] >= 0:
        local_mask = construct_local_mask(seqlen_q, seqlen_k, window_size, query_padding_mask, key_padding_mask)
        scores.masked_fill_(local_mask, float("-inf"))
    if learnable_sink is None:
        attention = torch.softmax(scores, dim=-1)
    else:
        logits_max = torch.amax(scores, dim=-1, keepdim=True)
        learnable_sink = learnable_sink.double().view(-1, 1, 1)
        logits_or_sinks_max = torch.maximum(learnable_sink, logits_max)
        unnormalized_scores = torch.exp(scores - logits_or_sinks_max)
        normalizer = unnormalized_scores.sum(dim=-1, keepdim=True) + torch.exp(learnable_sink - logits_or_sinks_max)
        attention = unnormalized_scores / normalizer
    if query_padding_mask is not None:
        attention = attention.masked_fill(~query_padding_mask[:, None, :, None], 0.0)
    if key_padding_mask is not None:
        attention = attention.masked_fill(~key_padding_mask[:, None, None, :], 0.0)
    # Some rows might be completely masked out: flash-attn fills them with zero instead of NaN
    if local_mask is not None:
        attention = attention.masked_fill(torch.all(local_mask, dim=-1, keepdim=True), 0.0)
    output = torch.einsum("bhts,bshd->bthd", attention, v)
    if query_padding_mask is not None:
        output.masked_fill_(~query_padding_mask[:, :, None, None], 0.0)
    return output.to(dtype_og)
