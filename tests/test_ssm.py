"""The packed state-space scans equal transformers' own torch implementations run on each segment alone.

Oracles: ``causal_conv1d_forward`` with a transformers ``LinearAttentionLayer`` cache (the conv
output and the conv state the model's cache keeps), ``mamba2_chunk_scan`` (Mamba2's SSD scan, with
its ``initial_states`` and final state) and ``mamba_selective_scan`` / ``mamba_selective_state_update``
(Mamba1's scan and its one-token recurrent form), all from transformers' modeling files, fp32.
"""

import numpy as np
import pytest
import torch
from transformers.cache_utils import Cache, LinearAttentionLayer
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2

from prepack.mixers import ssm

LENGTHS = [7, 1, 3, 12, 2]  # shorter and longer than the conv width and the SSD chunk


def _split(t: torch.Tensor, lengths, dim: int):
    return torch.split(t, list(lengths), dim=dim)


def _conv_alone(x, conv, cache=None):
    """transformers' conv on one sequence ``(C, L)``: output and the conv state its cache keeps."""
    cache = cache if cache is not None else Cache(layers=[LinearAttentionLayer()])
    out = modeling_mamba2.causal_conv1d_forward(conv, x[None], cache, 0, activation="silu")
    return out[0], cache.layers[0].conv_states[0][0], cache


def _conv(channels=6, width=4, bias=True):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=bias)
    return conv.requires_grad_(False)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_segment_conv1d_matches_transformers_conv_on_each_segment_alone(width):
    conv = _conv(width=width)
    x = torch.randn(6, sum(LENGTHS))
    out, final = ssm.segment_conv1d(x, conv.weight.squeeze(1), conv.bias, LENGTHS, activation="silu")
    for i, seg in enumerate(_split(x, LENGTHS, 1)):
        want, want_state, _ = _conv_alone(seg, conv)
        torch.testing.assert_close(out[:, sum(LENGTHS[:i]) : sum(LENGTHS[: i + 1])], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(final[i], want_state, atol=0, rtol=0)


def test_segment_conv1d_continues_each_segment_from_its_cached_conv_state():
    conv = _conv()
    firsts = [torch.randn(6, n) for n in (5, 1, 2)]
    seconds = [torch.randn(6, n) for n in (3, 2, 1)]
    caches, states = [], []
    for first in firsts:
        _, state, cache = _conv_alone(first, conv)
        caches.append(cache)
        states.append(state.clone())
    x = torch.cat(seconds, dim=1)
    out, final = ssm.segment_conv1d(
        x, conv.weight.squeeze(1), conv.bias, [3, 2, 1], activation="silu", initial_states=torch.stack(states)
    )
    offset = 0
    for i, second in enumerate(seconds):
        want, want_state, _ = _conv_alone(second, conv, caches[i])
        torch.testing.assert_close(out[:, offset : offset + second.shape[1]], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(final[i], want_state, atol=0, rtol=0)
        offset += second.shape[1]


def _ssd_inputs(total, heads=4, head_dim=3, groups=2, state=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(total, heads, head_dim, generator=g),
        dt=torch.randn(total, heads, generator=g),
        A=-torch.rand(heads, generator=g) * 2,
        B=torch.randn(total, groups, state, generator=g),
        C=torch.randn(total, groups, state, generator=g),
    ), dict(D=torch.randn(heads, generator=g), dt_bias=torch.randn(heads, generator=g))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_ssd_scan_matches_transformers_chunk_scan_on_each_segment_alone(chunk_size):
    t, p = _ssd_inputs(sum(LENGTHS))
    limit = (0.0, 4.0)
    y, final = ssm.ssd_scan(**t, lengths=LENGTHS, chunk_size=chunk_size, dt_softplus=True, dt_limit=limit, **p)
    offset = 0
    for i, n in enumerate(LENGTHS):
        seg = {k: v[offset : offset + n][None] if k != "A" else v for k, v in t.items()}
        want, want_state = modeling_mamba2.mamba2_chunk_scan(
            seg["x"], seg["dt"], seg["A"], seg["B"], seg["C"], chunk_size,
            dt_softplus=True, dt_limit=limit, return_final_states=True, **p,
        )
        torch.testing.assert_close(y[offset : offset + n], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], want_state[0], atol=1e-5, rtol=1e-5)
        offset += n


def test_ssd_scan_starts_each_segment_from_its_initial_state():
    t, p = _ssd_inputs(sum(LENGTHS))
    init = torch.randn(len(LENGTHS), 4, 3, 5)
    y, final = ssm.ssd_scan(**t, lengths=LENGTHS, chunk_size=4, dt_softplus=True, initial_states=init, **p)
    offset = 0
    for i, n in enumerate(LENGTHS):
        seg = {k: v[offset : offset + n][None] if k != "A" else v for k, v in t.items()}
        want, want_state = modeling_mamba2.mamba2_chunk_scan(
            seg["x"], seg["dt"], seg["A"], seg["B"], seg["C"], 4,
            dt_softplus=True, initial_states=init[i : i + 1], return_final_states=True, **p,
        )
        torch.testing.assert_close(y[offset : offset + n], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], want_state[0], atol=1e-5, rtol=1e-5)
        offset += n


def _mamba1_inputs(total, channels=6, state=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(channels, total, generator=g),
        delta=torch.randn(channels, total, generator=g),
        A=-torch.rand(channels, state, generator=g) * 2,
        B=torch.randn(state, total, generator=g),
        C=torch.randn(state, total, generator=g),
    ), dict(
        D=torch.randn(channels, generator=g),
        z=torch.randn(channels, total, generator=g),
        delta_bias=torch.randn(channels, generator=g),
    )


def test_selective_scan_matches_transformers_scan_on_each_segment_alone():
    t, p = _mamba1_inputs(sum(LENGTHS))
    y, final = ssm.selective_scan(**t, lengths=LENGTHS, delta_softplus=True, **p)
    offset = 0
    for i, n in enumerate(LENGTHS):
        cut = slice(offset, offset + n)
        want, want_state = modeling_mamba.mamba_selective_scan(
            t["u"][None, :, cut], t["delta"][None, :, cut], t["A"], t["B"][None, :, cut], t["C"][None, :, cut],
            D=p["D"], z=p["z"][None, :, cut], delta_bias=p["delta_bias"], delta_softplus=True, return_last_state=True,
        )
        torch.testing.assert_close(y[:, cut], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], want_state[0], atol=1e-5, rtol=1e-5)
        offset += n


def test_selective_scan_continues_each_segment_like_transformers_recurrent_steps():
    t, p = _mamba1_inputs(sum(LENGTHS))
    init = torch.randn(len(LENGTHS), 6, 4)
    y, final = ssm.selective_scan(**t, lengths=LENGTHS, delta_softplus=True, initial_states=init, **p)
    offset = 0
    for i, n in enumerate(LENGTHS):
        state = init[i : i + 1].clone()
        for s in range(offset, offset + n):
            want = modeling_mamba.mamba_selective_state_update(
                state, t["u"][None, :, s], t["delta"][None, :, s], t["A"], t["B"][None, :, s], t["C"][None, :, s],
                p["D"], z=p["z"][None, :, s], dt_bias=p["delta_bias"], dt_softplus=True,
            )
            torch.testing.assert_close(y[:, s], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], state[0], atol=1e-5, rtol=1e-5)
        offset += n


def test_segment_lengths_that_do_not_cover_the_stream_are_refused():
    conv = _conv()
    with pytest.raises(ValueError, match="sum to 5 but the stream has 6"):
        ssm.segment_conv1d(torch.randn(6, 6), conv.weight.squeeze(1), conv.bias, [2, 3])
    with pytest.raises(ValueError, match="positive"):
        ssm.seq_idx([2, 0], "cpu")


def _shim_ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
              return_varlen_states=False):
    """mamba-ssm's ``mamba_chunk_scan_combined`` signature, computed per segment by transformers' torch scan."""
    assert seq_idx is not None and seq_idx.dtype == torch.int32 and seq_idx.shape == x.shape[:2]
    assert return_varlen_states and not return_final_states and z is None and initial_states is None
    cu = cu_seqlens.tolist()
    assert torch.equal(seq_idx[0], torch.repeat_interleave(torch.arange(len(cu) - 1, dtype=torch.int32), torch.diff(cu_seqlens)))
    outs, states = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        y, s = modeling_mamba2.mamba2_chunk_scan(
            x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], chunk_size, D=D, dt_bias=dt_bias,
            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True,
        )
        outs.append(y)
        states.append(s)
    return torch.cat(outs, dim=1), torch.cat(states)


def _shim_conv(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
               final_states_out=None, activation=None):
    """causal-conv1d's ``causal_conv1d_fn`` signature, computed per segment by transformers' torch conv."""
    assert x.stride(1) == 1, "causal-conv1d takes seq_idx only in the channels-last layout"
    assert seq_idx is not None and seq_idx.dtype == torch.int32 and initial_states is None and not return_final_states
    bounds = np.flatnonzero(np.diff(np.r_[-1, seq_idx[0].numpy(), -2])).tolist()
    outs = [
        modeling_mamba2.causal_conv1d_fn(x[:, :, a:b], weight, bias, activation=activation)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=-1)


def test_kernel_adapters_pass_seq_idx_and_return_what_the_torch_scans_return():
    t, p = _ssd_inputs(sum(LENGTHS))
    y, final = ssm.kernel_ssd_scan(_shim_ssd, **t, lengths=LENGTHS, chunk_size=4, dt_softplus=True, **p)
    want_y, want_final = ssm.ssd_scan(**t, lengths=LENGTHS, chunk_size=4, dt_softplus=True, **p)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, want_final, atol=1e-5, rtol=1e-5)

    conv = _conv()
    x = torch.randn(6, sum(LENGTHS))
    out, states = ssm.kernel_conv1d(_shim_conv, x, conv.weight.squeeze(1), conv.bias, LENGTHS, activation="silu")
    want_out, want_states = ssm.segment_conv1d(x, conv.weight.squeeze(1), conv.bias, LENGTHS, activation="silu")
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(states, want_states, atol=0, rtol=0)
