"""PackedBatch: layout fields, varlen view, masks and unpack, all derived from one plan."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack


@st.composite
def requests(draw, max_len=24):
    n = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    seqs = [rng.integers(1, 1000, n_) for n_ in lengths]
    capacity = draw(st.integers(max(lengths), max(lengths) * 3))
    return seqs, capacity


def naive_mask(seg: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference for the block-diagonal causal mask."""
    R, C = seg.shape
    out = torch.zeros(R, 1, C, C, dtype=torch.bool)
    for r in range(R):
        for i in range(C):
            for j in range(C):
                out[r, 0, i, j] = (seg[r, i] >= 0 and seg[r, i] == seg[r, j] and j <= i) or i == j
    return out


@settings(max_examples=80, deadline=None)
@given(requests(), st.sampled_from(["bfd", "ffd", "none", "sorted"]))
def test_unpack_of_pack_gives_back_every_request(data, algorithm):
    seqs, capacity = data
    b = prepack.pack(seqs, capacity, algorithm=algorithm)
    for got, want in zip(b.unpack(b.input_ids), seqs, strict=True):
        assert got.tolist() == want.tolist()
    for got, want in zip(b.unpack(b.to_varlen().input_ids), seqs, strict=True):
        assert got.tolist() == want.tolist()


@settings(max_examples=80, deadline=None)
@given(requests())
def test_position_ids_restart_at_zero_for_each_request(data):
    seqs, capacity = data
    b = prepack.pack(seqs, capacity)
    for pos, s in zip(b.unpack(b.position_ids), seqs, strict=True):
        assert pos.tolist() == list(range(len(s)))
    assert (b.position_ids[b.segment_ids < 0] == 0).all()


@settings(max_examples=80, deadline=None)
@given(requests())
def test_segments_do_not_overlap_and_padding_is_minus_one(data):
    seqs, capacity = data
    b = prepack.pack(seqs, capacity, pad_id=0)
    counts = torch.bincount(b.segment_ids[b.segment_ids >= 0].flatten(), minlength=len(seqs))
    assert counts.tolist() == [len(s) for s in seqs]
    assert (b.input_ids[b.segment_ids < 0] == 0).all()


@settings(max_examples=80, deadline=None)
@given(requests())
def test_cu_seqlens_match_the_lengths_in_packed_order(data):
    seqs, capacity = data
    b = prepack.pack(seqs, capacity)
    assert b.cu_seqlens.dtype == torch.int32
    lengths = np.diff(b.cu_seqlens.numpy())
    assert lengths.tolist() == [len(seqs[i]) for i in b.plan.order]
    assert b.max_seqlen == max(len(s) for s in seqs)
    v = b.to_varlen()
    assert v.input_ids.shape[0] == b.cu_seqlens[-1] == sum(len(s) for s in seqs)
    assert torch.equal(b.input_ids.flatten()[v.indices], v.input_ids)


@settings(max_examples=40, deadline=None)
@given(requests(max_len=8))
def test_dense_mask_equals_a_token_by_token_reference(data):
    seqs, capacity = data
    b = prepack.pack(seqs, capacity)
    assert torch.equal(b.attention_mask("bool"), naive_mask(b.segment_ids))


def test_additive_mask_uses_zero_and_the_dtype_minimum():
    b = prepack.pack([[1, 2], [3]], 3)
    m = b.attention_mask("additive", torch.float16)
    assert m.dtype == torch.float16 and m.shape == (1, 1, 3, 3)
    assert set(m.unique().tolist()) == {0.0, torch.finfo(torch.float16).min}


def test_sliding_window_mask_keeps_only_the_last_window_positions():
    b = prepack.pack([[1, 2, 3, 4]], 4)
    m = b.attention_mask(window=2)[0, 0]
    assert m.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_row_micro_batch_varlen_has_relative_cu_seqlens():
    b = prepack.pack([[1] * 5, [2] * 3, [3] * 4, [4] * 2], 8)
    total = 0
    for r in range(b.num_rows):
        v = b.to_varlen(slice(r, r + 1))
        assert v.cu_seqlens[0] == 0 and v.cu_seqlens[-1] == len(v.input_ids) == b.plan.row_lengths[r]
        total += len(v.input_ids)
    assert total == 14


def test_tensors_and_arrays_are_accepted_as_requests():
    b = prepack.pack([torch.tensor([1, 2]), np.array([3], dtype=np.int32), [4, 5, 6]])
    assert [x.tolist() for x in b.unpack(b.input_ids)] == [[1, 2], [3], [4, 5, 6]]


def test_truncate_left_keeps_the_last_tokens_and_reports_the_cut():
    b = prepack.pack([[1, 2, 3, 4, 5], [6]], 3, overflow="truncate_left")
    assert b.unpack(b.input_ids)[0].tolist() == [3, 4, 5]
    assert b.truncated.tolist() == [2, 0]


def test_truncate_right_keeps_the_first_tokens():
    b = prepack.pack([[1, 2, 3, 4, 5]], 3, overflow="truncate_right")
    assert b.unpack(b.input_ids)[0].tolist() == [1, 2, 3]


def test_over_capacity_request_raises_by_default_naming_the_fix():
    with pytest.raises(ValueError, match=r'request 1 has 5 tokens but capacity is 3 \(pass overflow="truncate_left"'):
        prepack.pack([[1], [1, 2, 3, 4, 5]], 3)


def test_empty_request_error_names_its_index():
    with pytest.raises(ValueError, match="request 1 is empty"):
        prepack.pack([[1], []])


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[1, 2], [0.5, 2.0]], "request 1 has dtype float64"),
        ([[1, -3]], "request 0 has a negative token id -3"),
        ([[[1, 2], [3, 4]]], r"request 0 has shape \(2, 2\)"),
        ([torch.tensor([1.0, 2.0])], "request 0 has dtype torch.float32"),
    ],
)
def test_bad_token_ids_are_rejected_naming_the_request(bad, message):
    with pytest.raises(ValueError, match=message):
        prepack.pack(bad)


def test_unpack_rejects_a_tensor_of_the_wrong_shape():
    b = prepack.pack([[1, 2], [3]], 4)
    with pytest.raises(ValueError, match="cannot unpack a tensor of shape"):
        b.unpack(torch.zeros(7))


@pytest.mark.parametrize("kwargs, message", [
    ({"overflow": "typo"}, "overflow must be one of 'error', 'truncate_left', 'truncate_right', got 'typo'"),
    ({"algorithm": "fastest"}, "unknown algorithm 'fastest'"),
    ({"capacity": 0}, "capacity must be a positive integer"),
])
def test_bad_arguments_are_rejected_even_when_nothing_overflows(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepack.pack([[1, 2], [3]], **{"capacity": 8, **kwargs})


@settings(max_examples=40, deadline=None)
@given(requests(max_len=12), st.integers(1, 6))
def test_chunked_mask_is_transformers_chunked_causal_mask_within_each_request(data, chunk):
    from transformers.masking_utils import chunked_overlay

    seqs, capacity = data
    b = prepack.pack(seqs, capacity)
    got = b.attention_mask(chunk=chunk)
    same_chunk = chunked_overlay(chunk, torch.zeros(1, dtype=torch.long))  # transformers' own definition
    pos = b.position_ids
    want = naive_mask(b.segment_ids)
    for r in range(b.num_rows):
        chunks = same_chunk(0, 0, pos[r][:, None], pos[r][None, :])
        want[r, 0] &= chunks | torch.eye(b.capacity, dtype=torch.bool)
    assert torch.equal(got, want)
