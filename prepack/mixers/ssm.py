"""Exact state-space scans over a packed stream: every segment starts from its own state.

A packed forward lays N requests back to back in one ``(T,)`` token stream. Attention keeps
them apart with ``cu_seqlens``; a state-space layer (Mamba, Mamba2 / SSD) has two more places
where one request would leak into the next, and each function here closes one of them:

* :func:`segment_conv1d` -- the depthwise causal convolution in front of the scan reads the
  ``K - 1`` tokens before each position; at a segment's start those are the segment's own
  initial conv state (zeros for a fresh prompt), never the previous request's last tokens.
* :func:`ssd_scan` -- Mamba2's chunked scan (state space duality): every segment starts from its
  initial SSM state, and its final state is returned on its own.
* :func:`selective_scan` -- Mamba1's selective scan, the same contract.

Each follows transformers' own torch implementation (``causal_conv1d_fn``, ``mamba2_chunk_scan``,
``mamba_selective_scan`` in ``modeling_mamba2`` / ``modeling_mamba``) operation for operation
on each segment, so a request's outputs and final states equal that implementation run on the
request alone (tests/test_ssm.py checks this in fp32). Segments are given by host ``lengths``
(the plan's, :mod:`prepack.planner.layout`), so no function reads a length back from the device.

The CUDA kernels that do the same job (mamba-ssm's ``mamba_chunk_scan_combined(seq_idx=...)``,
causal-conv1d's ``causal_conv1d_fn(seq_idx=...)``) are optional: :func:`ssd_scan_kernel` and
:func:`conv1d_kernel` return them behind an import guard, and :func:`kernel_ssd_scan` /
:func:`kernel_conv1d` adapt their signatures to the functions here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..planner.layout import cu_seqlens, ranges, starts


def _activation(name: str | None):
    """transformers' activation of that name (``ACT2FN``), or identity for None."""
    if name is None:
        return lambda x: x
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _host_lengths(lengths) -> np.ndarray:
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or (lengths < 1).any():
        raise ValueError(f"segment lengths must be a 1-D list of positive integers, got {lengths.tolist()}")
    return lengths


def _gapped_index(lengths: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each token of a packed stream goes when ``gap`` slots are opened before every segment.

    Returns ``(tokens, gaps, total)``: ``tokens`` (T,) the new index of each stream token,
    ``gaps`` (N, gap) the slots in front of each segment, ``total`` the gapped length.
    """
    new_starts = starts(lengths + gap) + gap
    tokens = ranges(new_starts, lengths)
    gaps = new_starts[:, None] - gap + np.arange(gap)[None, :]
    return tokens, gaps, int((lengths + gap).sum())


def segment_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lengths,
    activation: str | None = None,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d over a packed stream, each segment from its own initial conv state.

    The stream is re-laid with ``K - 1`` slots before each segment, filled with the segment's
    initial state (zeros for a fresh prompt); one ``F.conv1d`` then runs the same operation
    transformers' ``causal_conv1d_fn`` runs on a single sequence, and the gaps are dropped.

    Args:
        x: ``(C, T)`` channels-first packed stream.
        weight: ``(C, K)`` depthwise kernel (``conv1d.weight.squeeze(1)``).
        bias: ``(C,)`` or None.
        lengths: ``(N,)`` host segment lengths, summing to T.
        activation: transformers' activation name applied to the output (``"silu"``) or None.
        initial_states: ``(N, C, K)`` each segment's cached conv state (the last K inputs the
            model's cache keeps), or None for zeros.

    Returns:
        ``out (C, T)`` in x's dtype, and ``final (N, C, K)``: the conv state transformers'
        cache keeps after each segment (its last K inputs, zero-padded on the left when the
        segment and its initial state are shorter).
    """
    lengths = _host_lengths(lengths)
    channels, total = x.shape
    width = weight.shape[-1]
    if int(lengths.sum()) != total:
        raise ValueError(f"segment lengths sum to {int(lengths.sum())} but the stream has {total} tokens")
    # K - 1 slots before each segment: every output window and the K-wide state the cache keeps
    # after the segment read at most that far back (a segment has at least one token).
    tokens, gaps, gapped_len = _gapped_index(lengths, width - 1)
    gapped = x.new_zeros(channels, gapped_len)
    tokens_t = torch.as_tensor(tokens, device=x.device)
    gapped[:, tokens_t] = x
    if initial_states is not None:
        if initial_states.shape != (len(lengths), channels, width):
            raise ValueError(
                f"initial conv states have shape {tuple(initial_states.shape)}, expected {(len(lengths), channels, width)}"
            )
        gaps_t = torch.as_tensor(gaps, device=x.device)
        gapped[:, gaps_t] = initial_states[..., 1:].to(x.dtype).permute(1, 0, 2)
    out = F.conv1d(gapped[None].to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=channels)
    out = _activation(activation)(out[0, :, :gapped_len][:, tokens_t])
    ends = torch.as_tensor(tokens[np.cumsum(lengths) - 1] + 1, device=x.device)
    window = ends[:, None] - width + torch.arange(width, device=x.device)[None, :]
    final = gapped[:, window].permute(1, 0, 2)
    return out.to(x.dtype), final


_CHUNK_GROUP = 1  # chunks per step of the within-chunk part: 1 measured fastest (bench_ssm_scan.py, 1 thread)


def _segment_sum(values: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """``(..., S) -> (..., S, S)``: ``out[i, j] = sum(values[j+1 : i+1])`` within one segment, else -inf.

    transformers' ``segment_sum`` (cumulative sums under masks, no subtraction), with pairs of
    positions from different segments masked like the upper triangle.
    """
    size = values.size(-1)
    expanded = values[..., None].expand(*values.size(), size)
    below = torch.tril(torch.ones(size, size, device=values.device, dtype=torch.bool), diagonal=-1)
    summed = torch.cumsum(expanded.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(size, size, device=values.device, dtype=torch.bool), diagonal=0)
    keep = keep & (segment[:, None] == segment[None, :])
    return summed.masked_fill(~keep, -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lengths,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's chunked scan (SSD) over a packed stream, each segment from its own initial state.

    Each segment is cut into its own chunks (zero-padded to a multiple of ``chunk_size``, as
    transformers pads a single sequence), so every chunk's diagonal block and chunk state are the
    ones the segment alone computes; the state passed between chunks never crosses a segment
    boundary (the decay between chunks of different segments is ``exp(-inf) = 0``).

    Args:
        x: ``(T, H, P)`` scan input (heads, head dim).
        dt: ``(T, H)`` time steps before ``dt_bias`` and softplus.
        A: ``(H,)`` (negative) state decay rates.
        B, C: ``(T, G, N)`` input / output projections (G groups, N state size).
        lengths: ``(S,)`` host segment lengths summing to T.
        chunk_size: the model's SSD chunk size.
        D: ``(H,)`` skip connection or None. dt_bias: ``(H,)`` or None.
        dt_softplus, dt_limit: as transformers' ``mamba2_chunk_scan``.
        initial_states: ``(S, H, P, N)`` each segment's SSM state, or None for zeros.

    Returns:
        ``y (T, H, P)`` float32 and ``final (S, H, P, N)`` float32: each segment's SSM state after
        its last token.
    """
    lengths = _host_lengths(lengths)
    total, heads, head_dim = x.shape
    groups, state = B.shape[1], B.shape[2]
    if int(lengths.sum()) != total:
        raise ValueError(f"segment lengths sum to {int(lengths.sum())} but the stream has {total} tokens")
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = x.float()
    B = B.float().repeat_interleave(heads // groups, dim=1, output_size=heads)
    C = C.float().repeat_interleave(heads // groups, dim=1, output_size=heads)
    residual = D[..., None] * x if D is not None else None
    x = x * dt[..., None].float()
    A = A.to(x.dtype) * dt.float()

    chunks = -(-lengths // chunk_size)
    padded_tokens = ranges(starts(chunks) * chunk_size, lengths)
    dev = x.device
    where = torch.as_tensor(padded_tokens, device=dev)
    n_chunks = int(chunks.sum())

    def chunked(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(n_chunks * chunk_size, *t.shape[1:])
        out[where] = t
        return out.reshape(1, n_chunks, chunk_size, *t.shape[1:])

    xc, Ac, Bc, Cc = chunked(x), chunked(A), chunked(B), chunked(C)
    Ac = Ac.permute(0, 3, 1, 2)  # (1, h, c, l)
    A_cumsum = torch.cumsum(Ac, dim=-1)
    # chunk by chunk: the (chunk, l, l, heads) decay and score tensors of every chunk at once fall out of cache
    parts = [
        _ssd_within_chunks(xc[:, a:a + _CHUNK_GROUP], Ac[:, :, a:a + _CHUNK_GROUP], Bc[:, a:a + _CHUNK_GROUP],
                           Cc[:, a:a + _CHUNK_GROUP], A_cumsum[:, :, a:a + _CHUNK_GROUP])
        for a in range(0, n_chunks, _CHUNK_GROUP)
    ]
    y_diag, chunk_states = (torch.cat(t, dim=1) for t in zip(*parts))
    start_states, final = _ssd_between_chunks(chunk_states, A_cumsum, chunks, initial_states, (heads, head_dim, state))
    y_off = torch.einsum("bclhn,bchpn->bclhp", Cc, start_states) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).reshape(-1, heads, head_dim)[where]
    if residual is not None:
        y = y + residual
    return y, final


def _ssd_within_chunks(xc, Ac, Bc, Cc, A_cumsum):
    """transformers' steps 1-2 on chunks ``(1, c, l, h, .)``: each chunk's output from its own tokens
    ``(1, c, l, h, p)`` and its end state from zero ``(1, c, h, p, n)``."""
    decay = torch.exp(_segment_sum(Ac, torch.zeros(Ac.shape[-1], dtype=torch.long, device=Ac.device)))
    scores = torch.einsum("bclhn,bcshn->bclsh", Cc, Bc) * decay.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", scores, xc)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    B_decay = Bc * decay_states.permute(0, -2, -1, 1)[..., None]
    return y_diag, torch.einsum("bclhn,bclhp->bchpn", B_decay, xc)


def _ssd_between_chunks(chunk_states, A_cumsum, chunks, initial_states, dims):
    """Step 3, per segment: each chunk's start state and each segment's final state.

    Every segment gets one slot for its initial state followed by its chunks' end states (transformers
    prepends the initial state the same way); ``_segment_sum`` keeps the decay inside a segment.
    Returns ``start (1, c, h, p, n)`` and ``final (S, h, p, n)``.
    """
    heads, head_dim, state = dims
    dev = chunk_states.device
    segments = len(chunks)
    slot_of_chunk = torch.as_tensor(np.arange(int(chunks.sum())) + np.repeat(np.arange(segments) + 1, chunks), device=dev)
    first_slot = torch.as_tensor(starts(chunks + 1), device=dev)
    last_slot = torch.as_tensor(starts(chunks + 1) + chunks, device=dev)
    n_slots = int(chunks.sum()) + segments
    slots = chunk_states.new_zeros(1, n_slots, heads, head_dim, state)
    slots[:, slot_of_chunk] = chunk_states
    if initial_states is not None:
        slots[0, first_slot] = initial_states.to(dtype=slots.dtype, device=dev)
    decays = A_cumsum.new_zeros(1, heads, n_slots)
    decays[:, :, slot_of_chunk] = A_cumsum[:, :, :, -1]
    segment = torch.as_tensor(np.repeat(np.arange(segments), chunks + 1), device=dev)
    decay_chunk = torch.exp(_segment_sum(decays, segment)).transpose(1, 3)
    new_slots = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, slots)
    return new_slots[:, slot_of_chunk - 1], new_slots[0, last_slot]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lengths,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba1's selective scan over a packed stream, each segment from its own initial state.

    transformers' sequential fallback runs ``h = exp(A dt) h + dt B u`` token by token over one
    sequence; here step t advances every segment longer than t at once (the segments sorted
    longest first, so the ones still running are a prefix of the batch), with the discretised
    ``exp(A dt)`` and ``dt B u`` computed for the whole stream as transformers computes them for
    one sequence. A segment's state after its last step is its final state.

    Args:
        u: ``(D_in, T)`` scan input. delta: ``(D_in, T)`` time steps before bias and softplus.
        A: ``(D_in, N)``. B, C: ``(N, T)``.
        lengths: ``(S,)`` host segment lengths summing to T.
        D: ``(D_in,)`` or None. z: ``(D_in, T)`` gate (``out * silu(z)``) or None.
        delta_bias: ``(D_in,)`` or None. delta_softplus: as transformers.
        initial_states: ``(S, D_in, N)`` or None for zeros.

    Returns:
        ``y (D_in, T)`` in u's dtype and ``final (S, D_in, N)``.
    """
    lengths = _host_lengths(lengths)
    channels, total = u.shape
    if int(lengths.sum()) != total:
        raise ValueError(f"segment lengths sum to {int(lengths.sum())} but the stream has {total} tokens")
    dtype = u.dtype
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    # token-major (T, D_in, N), so each step gathers whole rows
    dA = torch.exp(A[None] * delta.t()[:, :, None])
    dBu = delta.t()[:, :, None] * B.t()[:, None, :].float() * u.t()[:, :, None].float()
    order = np.argsort(-lengths, kind="stable")
    first = starts(lengths)[order]
    running = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")  # segments longer than t
    h = u.new_zeros(len(lengths), channels, A.shape[-1])
    if initial_states is not None:
        h = initial_states[torch.as_tensor(order, device=u.device)].to(dtype).clone()
    y = u.new_empty(total, channels)
    Ct = C.t().to(dtype)
    for t, k in enumerate(running.tolist()):
        at = torch.as_tensor(first[:k] + t, device=u.device)
        h[:k] = dA.index_select(0, at) * h[:k] + dBu.index_select(0, at)
        y.index_copy_(0, at, torch.bmm(h[:k].to(dtype), Ct.index_select(0, at)[:, :, None])[..., 0])
    y = y.t()
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    final = torch.empty_like(h)
    final[torch.as_tensor(order, device=u.device)] = h
    return y, final


@functools.cache
def ssd_scan_kernel():
    """mamba-ssm's ``mamba_chunk_scan_combined`` (it keeps segments apart with ``seq_idx``), or None."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


@functools.cache
def conv1d_kernel():
    """causal-conv1d's ``causal_conv1d_fn`` (it keeps segments apart with ``seq_idx``), or None."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def seq_idx(lengths, device) -> torch.Tensor:
    """``(1, T) int32``: the segment index of each token, the ``seq_idx`` the CUDA kernels take."""
    lengths = _host_lengths(lengths)
    return torch.as_tensor(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths), device=device)[None]


def kernel_ssd_scan(kernel, x, dt, A, B, C, lengths, chunk_size, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """:func:`ssd_scan` through mamba-ssm's ``mamba_chunk_scan_combined`` for fresh segments.

    ``seq_idx`` keeps the segments apart inside the kernel and ``return_varlen_states`` (with
    ``cu_seqlens``) returns each one's final state. The kernel takes no per-segment initial
    states, so continuing a request's state goes through :func:`ssd_scan`.

    Returns ``y (T, H, P)`` and ``final (S, H, P, N)``, as :func:`ssd_scan`.
    """
    cu = torch.as_tensor(cu_seqlens(_host_lengths(lengths)), device=x.device)
    out = kernel(
        x[None], dt[None], A, B[None], C[None], chunk_size, D=D, z=None, dt_bias=dt_bias,
        seq_idx=seq_idx(lengths, x.device), cu_seqlens=cu, dt_softplus=dt_softplus, dt_limit=dt_limit,
        return_final_states=False, return_varlen_states=True,
    )
    y, final = out
    return y[0], final


def kernel_conv1d(kernel, x, weight, bias, lengths, activation=None):
    """:func:`segment_conv1d` through causal-conv1d's ``causal_conv1d_fn(seq_idx=...)`` for fresh segments.

    The kernel wants the channels-last layout for ``seq_idx`` and returns no per-segment final
    state, so the final states are gathered here from the input: the last K inputs of each segment.
    Returns ``out (C, T)`` and ``final (N, C, K)``, as :func:`segment_conv1d`.
    """
    lengths = _host_lengths(lengths)
    width = weight.shape[-1]
    channels_last = x.t().contiguous().t()[None]
    out = kernel(channels_last, weight, bias, seq_idx=seq_idx(lengths, x.device), activation=activation)[0]
    ends = torch.as_tensor(starts(lengths) + lengths, device=x.device)
    window = ends[:, None] - width + torch.arange(width, device=x.device)[None, :]
    inside = window >= torch.as_tensor(starts(lengths), device=x.device)[:, None]
    final = x[:, window.clamp(min=0)] * inside[None]
    return out, final.permute(1, 0, 2)
