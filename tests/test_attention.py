"""Every backend has flash_attn_varlen_func's signature and matches flash-attn's own ``attention_ref``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack
from prepack.attention import functions as attention

from .conftest import flash_attn_installed, gpu
from .flash_attn_reference import attention_ref

CPU_BACKENDS = ["sdpa_varlen", "sdpa_masked", "flex"]


def random_varlen(lengths, heads=4, kv_heads=2, dim=8, seed=0, k_lengths=None, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k_lengths = k_lengths or lengths
    cu_q = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, dim, generator=g)
    k = torch.randn(int(cu_k[-1]), kv_heads, dim, generator=g)
    v = torch.randn(int(cu_k[-1]), kv_heads, dim, generator=g)
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), cu_q.to(device), cu_k.to(device), max(lengths), max(k_lengths)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 20), min_size=1, max_size=6),
    st.sampled_from(CPU_BACKENDS),
    st.sampled_from([(-1, -1), (3, 0), (0, 0)]),
    st.sampled_from([0.0, 5.0]),
    st.sampled_from([(4, 4), (4, 2), (6, 1)]),
)
def test_backend_matches_flash_attn_reference(lengths, backend, window, softcap, heads):
    args = random_varlen(lengths, heads=heads[0], kv_heads=heads[1])
    want = varlen_attention_ref(*args, window_size=window, softcap=softcap)
    got = prepack.get_backend(backend)(*args, window_size=window, softcap=softcap)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def varlen_attention_ref(q, k, v, cu_q, cu_k, max_q=None, max_k=None, *, window_size=(-1, -1), softcap=0.0, causal=True):
    """flash-attn's ``attention_ref`` run on each segment of a varlen stream (the peer's semantics, not ours)."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(), strict=True):
        out[qs:qe] = attention_ref(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=causal, window_size=window_size, softcap=softcap,
        )[0]
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_with_shorter_queries_is_aligned_bottom_right_like_flash_attn(backend):
    # queries are the last tokens of each segment, as in chunked prefill
    args = random_varlen([2, 3], k_lengths=[5, 4])
    want = varlen_attention_ref(*args)
    torch.testing.assert_close(prepack.get_backend(backend)(*args), want, atol=1e-5, rtol=1e-5)


def test_a_segment_attends_only_to_itself():
    q, k, v, cu, _, m, _ = random_varlen([4, 4])
    out = attention.sdpa_varlen(q, k, v, cu, cu, m, m)
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 10.0
    v2[4:] -= 3.0  # change only the second segment
    out2 = attention.sdpa_varlen(q, k2, v2, cu, cu, m, m)
    torch.testing.assert_close(out[:4], out2[:4])


def test_heads_that_are_not_a_multiple_of_kv_heads_are_rejected():
    q, k, v, cu, _, m, _ = random_varlen([3], heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="3 heads, which is not a multiple of the 2 key/value heads"):
        attention.sdpa_varlen(q, k, v, cu, cu, m, m)


def test_auto_is_sdpa_varlen_on_cpu():
    assert prepack.resolve_backend("auto", device="cpu", dtype=torch.float32) == "sdpa_varlen"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, flash, torch_varlen, sdpa_varlen"):
        prepack.get_backend("fast")


@pytest.mark.skipif(torch.cuda.is_available() and flash_attn_installed(), reason="flash-attn is usable here")
def test_flash_without_cuda_or_flash_attn_names_the_fix():
    with pytest.raises(RuntimeError, match=r"(needs a CUDA GPU|pip install 'prepack\[flash\]')"):
        prepack.get_backend("flash")


@gpu
@pytest.mark.skipif(not flash_attn_installed(), reason="needs flash-attn")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window, softcap", [((-1, -1), 0.0), ((5, 0), 0.0), ((-1, -1), 20.0)])
def test_flash_matches_reference_on_gpu(dtype, window, softcap):
    args = random_varlen([1, 17, 64, 5], heads=8, kv_heads=2, dim=64, dtype=dtype, device="cuda")
    want = varlen_attention_ref(*args, window_size=window, softcap=softcap)
    got = prepack.get_backend("flash")(*args, window_size=window, softcap=softcap)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("backend", ["sdpa_varlen", "sdpa_masked", "flex"])
def test_torch_backends_match_reference_on_gpu(backend):
    args = random_varlen([1, 17, 64, 5], heads=8, kv_heads=2, dim=64, device="cuda")
    torch.testing.assert_close(
        prepack.get_backend(backend)(*args), varlen_attention_ref(*args), atol=1e-4, rtol=1e-4
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=8),
    st.sampled_from([(-1, -1), (3, 0), (0, 0)]),
    st.sampled_from([0.0, 5.0]),
    st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    st.sampled_from([8, 5]),
)
def test_single_query_segments_match_flash_attn_reference(k_lengths, window, softcap, heads, v_dim):
    """Decode steps: one new query per segment, continuing its segment's earlier keys (on CPU one fused
    call per segment on its keys in place, grouped query heads as one key head's queries; with softcap
    batched under a mask). ``v_dim`` 5: values with a head dim of their own (MLA)."""
    q, k, v, *rest = random_varlen([1] * len(k_lengths), heads=heads[0], kv_heads=heads[1], k_lengths=k_lengths)
    args = (q, k, torch.randn(*v.shape[:2], v_dim, generator=torch.Generator().manual_seed(1)), *rest)
    want = varlen_attention_ref(*args, window_size=window, softcap=softcap)
    got = prepack.get_backend("sdpa_varlen")(*args, window_size=window, softcap=softcap)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_single_query_segments_beside_longer_ones_each_see_their_own_keys():
    args = random_varlen([1, 4, 1, 1], k_lengths=[7, 4, 1, 12])
    want = varlen_attention_ref(*args)
    torch.testing.assert_close(prepack.get_backend("sdpa_varlen")(*args), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(0, 40)), min_size=1, max_size=5),
    st.sampled_from([(-1, -1), (4, 0)]),
)
def test_segments_continuing_earlier_keys_match_flash_attn_reference(segments, window):
    """A shared prefix's continuations, a long prompt's later chunks: lq new queries after lk - lq earlier keys."""
    q_lengths = [q for q, _ in segments]
    args = random_varlen(q_lengths, heads=8, kv_heads=2, k_lengths=[q + e for q, e in segments])
    want = varlen_attention_ref(*args, window_size=window)
    torch.testing.assert_close(prepack.get_backend("sdpa_varlen")(*args, window_size=window), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len, earlier", [(1, 5), (7, 1), (16, 40)])
def test_long_continued_segments_skip_the_mask_and_match_flash_attn_reference(q_len, earlier):
    """The mask-free path of long continued segments (two flash calls merged by log-sum-exp)."""
    q, k, v, cu_q, cu_k, _, _ = random_varlen([q_len], heads=8, kv_heads=2, k_lengths=[q_len + earlier])
    want = varlen_attention_ref(q, k, v, cu_q, cu_k, q_len, q_len + earlier)
    torch.testing.assert_close(attention._continued_causal(q, k, v, 8 ** -0.5), want, atol=1e-5, rtol=1e-5)
