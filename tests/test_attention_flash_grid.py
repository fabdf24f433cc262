"""flash-attn's own varlen test grid, on CPU in fp32, against flash-attn's ``attention_ref``.

Ported from ``test_flash_attn_varlen_output`` and ``test_flash_attn_varlen_causal``
(Dao-AILab/flash-attention ``tests/test_flash_attn.py``): MHA/MQA/GQA x causal x local window
x softcap, with seqlen_q above and below seqlen_k and random padding, shrunk so that CI runs it
in seconds. Every backend must give flash-attn's answer, including 0 for a query that sees no key.
"""

import pytest
import torch

import prepack

from .flash_attn_reference import attention_ref, generate_random_padding_mask, pad, unpad

BACKENDS = ["sdpa_varlen", "sdpa_masked", "flex", "reference"]
SEQLENS = [(1, 47), (13, 23), (23, 13), (32, 32), (31, 32), (32, 31), (40, 9)]


def _case(seqlen_q, seqlen_k, mha_type, local, seed, d=16, batch=3, nheads=6):
    g = torch.Generator().manual_seed(seed)
    nheads_k = {"mha": nheads, "mqa": 1, "gqa": 2}[mha_type]
    q = torch.randn(batch, seqlen_q, nheads, d, generator=g)
    k = torch.randn(batch, seqlen_k, nheads_k, d, generator=g)
    v = torch.randn(batch, seqlen_k, nheads_k, d, generator=g)
    window = tuple(torch.randint(0, seqlen_k, (2,), generator=g).tolist()) if local else (-1, -1)
    q_mask = generate_random_padding_mask(seqlen_q, batch, g)
    k_mask = generate_random_padding_mask(seqlen_k, batch, g)
    return q, k, v, q_mask, k_mask, window


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mha_type", ["mha", "mqa", "gqa"])
@pytest.mark.parametrize("causal, local", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_varlen_output_matches_flash_attn_reference(backend, mha_type, causal, local, softcap):
    for seed, (seqlen_q, seqlen_k) in enumerate(SEQLENS):
        q, k, v, q_mask, k_mask, window = _case(seqlen_q, seqlen_k, mha_type, local, seed)
        q_unpad, cu_q, max_q = unpad(q, q_mask)
        k_unpad, cu_k, max_k = unpad(k, k_mask)
        v_unpad, _, _ = unpad(v, k_mask)
        out_unpad = prepack.get_backend(backend)(
            q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k,
            causal=causal, window_size=window, softcap=softcap,
        )
        out = pad(out_unpad, q_mask)
        want = attention_ref(q, k, v, q_mask, k_mask, causal=causal, window_size=window, softcap=softcap)
        assert not out.isnan().any()
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=f"seqlens {seqlen_q}, {seqlen_k}, window {window}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_with_no_visible_key_give_zero_like_flash_attn(backend):
    # the minimal case: 5 queries over 2 keys, causal, bottom-right aligned
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(8, 2, 4, generator=g), torch.randn(5, 2, 4, generator=g), torch.randn(5, 2, 4, generator=g)
    cu_q, cu_k = torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32)
    out = prepack.get_backend(backend)(q, k, v, cu_q, cu_k, 5, 3, causal=True)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    q_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    k_mask = torch.tensor([[1] * 2 + [0], [1] * 3], dtype=torch.bool)
    want = attention_ref(pad(q, q_mask), pad(k, k_mask), pad(v, k_mask), q_mask, k_mask, causal=True)
    torch.testing.assert_close(pad(out, q_mask), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_a_segment_with_no_keys_gives_zero_not_nan(backend, causal):
    q, k, v = torch.randn(4, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([0, 0, 3], dtype=torch.int32)
    out = prepack.get_backend(backend)(q, k, v, cu_q, cu_k, 2, 3, causal=causal)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert not out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_at_least_max_seqlen_k_is_unbounded_as_in_flash_attn(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(12, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    fn = prepack.get_backend(backend)
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 7], dtype=torch.bool)
    for causal, window in ((True, (7, 0)), (False, (-1, 7))):
        # flash-attn's answer with no window at all
        want = attention_ref(pad(q, mask), pad(k, mask), pad(v, mask), mask, mask, causal=causal)
        out = fn(q, k, v, cu, cu, 7, 7, causal=causal, window_size=window)
        assert out.shape == (12, 2, 8)
        torch.testing.assert_close(pad(out, mask), want, atol=1e-5, rtol=1e-5, msg=f"causal={causal}, window={window}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_may_differ_from_query_head_dim(backend):
    # MLA-style: keys/queries of dim 12, values of dim 8
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(9, 4, 12, generator=g), torch.randn(9, 2, 12, generator=g), torch.randn(9, 2, 8, generator=g)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = prepack.get_backend(backend)(q, k, v, cu, cu, 5, 5, causal=True)
    assert out.shape == (9, 4, 8)
    mask = torch.tensor([[1] * 4 + [0], [1] * 5], dtype=torch.bool)
    want = attention_ref(pad(q, mask), pad(k, mask), pad(v, mask), mask, mask, causal=True)
    torch.testing.assert_close(pad(out, mask), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, local", [(True, False), (True, True), (False, False)])
def test_attention_sinks_match_flash_attn_reference(backend, causal, local):
    for seed, (seqlen_q, seqlen_k) in enumerate(SEQLENS):
        q, k, v, q_mask, k_mask, window = _case(seqlen_q, seqlen_k, "gqa", local, seed)
        sinks = torch.randn(q.shape[2], generator=torch.Generator().manual_seed(seed)) * 2
        q_unpad, cu_q, max_q = unpad(q, q_mask)
        k_unpad, cu_k, max_k = unpad(k, k_mask)
        v_unpad, _, _ = unpad(v, k_mask)
        out_unpad = prepack.get_backend(backend)(
            q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window, sinks=sinks,
        )
        want = attention_ref(q, k, v, q_mask, k_mask, causal=causal, window_size=window, learnable_sink=sinks)
        torch.testing.assert_close(pad(out_unpad, q_mask), want, atol=1e-5, rtol=1e-5, msg=f"seqlens {seqlen_q}, {seqlen_k}")
