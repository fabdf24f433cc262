"""prepack.data: whole-dataset packing for datasets pipelines and padding-free training."""

import functools

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack
from prepack.data import PACKED_COLUMNS, pack_dataset, pack_examples, pack_iterable, pack_stats, to_flash_kwargs

from .models import build


def token_lists(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, n).tolist() for n in lengths]


@st.composite
def examples(draw):
    capacity = draw(st.integers(4, 64))
    lengths = draw(st.lists(st.integers(1, capacity), min_size=1, max_size=40))
    return token_lists(lengths, draw(st.integers(0, 1000))), capacity


@settings(max_examples=60, deadline=None)
@given(examples(), st.booleans())
def test_every_example_appears_exactly_once_and_tokens_round_trip(data, padded):
    seqs, capacity = data
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), capacity, pad_id=0 if padded else None)
    stats = pack_stats(packed, capacity)
    seen = {}
    for row in packed:
        assert len(row["input_ids"]) <= capacity
        start = 0
        for ex, n in zip(row["example_ids"], row["seq_lengths"]):
            assert ex not in seen
            seen[ex] = row["input_ids"][start : start + n]
            start += n
    assert seen == dict(enumerate(seqs))
    assert stats.num_examples == len(seqs) and stats.num_rows == len(packed)


@settings(max_examples=60, deadline=None)
@given(examples(), st.booleans())
def test_labels_are_minus_100_exactly_at_sequence_starts_and_padding(data, padded):
    seqs, capacity = data
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), capacity, pad_id=0 if padded else None)
    for row in packed:
        starts = set(row["cu_seqlens"][:-1])
        real = row["cu_seqlens"][-1]
        for t, (tok, lab) in enumerate(zip(row["input_ids"], row["labels"])):
            assert lab == (-100 if t in starts or t >= real else tok)


@settings(max_examples=60, deadline=None)
@given(examples())
def test_position_ids_restart_and_cu_seqlens_match_seq_lengths(data):
    seqs, capacity = data
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), capacity)
    for row in packed:
        assert row["cu_seqlens"] == [0, *np.cumsum(row["seq_lengths"]).tolist()]
        assert row["position_ids"] == [p for n in row["seq_lengths"] for p in range(n)]


def test_whole_dataset_planning_reaches_the_l2_bound():
    lengths = np.random.default_rng(0).lognormal(4.0, 1.2, 3000).astype(int).clip(1, 512)
    ds = datasets.Dataset.from_dict({"input_ids": token_lists(lengths)})
    stats = pack_stats(pack_dataset(ds, 512), 512)
    assert stats.num_rows == stats.lower_bound_l2 and stats.gap_to_l2 == 0


def test_a_bigger_pool_never_needs_more_rows():
    lengths = np.random.default_rng(1).lognormal(4.0, 1.2, 4000).astype(int).clip(1, 512)
    ds = datasets.Dataset.from_dict({"input_ids": token_lists(lengths)})
    rows = [len(pack_dataset(ds, 512, pool_size=p)) for p in (100, 1000, None)]
    assert rows[0] >= rows[1] >= rows[2]


def test_padded_rows_are_exactly_capacity_long():
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": token_lists([3, 4, 7])}), 8, pad_id=9)
    assert all(len(r["input_ids"]) == 8 for r in packed)
    for r in packed:
        real = r["cu_seqlens"][-1]
        assert r["input_ids"][real:] == [9] * (8 - real) and r["labels"][real:] == [-100] * (8 - real)


def test_dataset_map_batched_with_indices_and_two_processes():
    ds = datasets.Dataset.from_dict({"input_ids": token_lists(np.arange(1, 41) % 13 + 1), "text": ["x"] * 40})
    fn = functools.partial(pack_examples, capacity=16)
    out = ds.map(fn, batched=True, batch_size=10, with_indices=True, remove_columns=ds.column_names, num_proc=2)
    assert set(out.column_names) == set(PACKED_COLUMNS)
    ids = sorted(i for row in out["example_ids"] for i in row)
    assert ids == list(range(40))


def test_map_function_accepts_arrow_batches():
    ds = datasets.Dataset.from_dict({"input_ids": token_lists([2, 3, 4])}).with_format("arrow")
    out = ds.map(functools.partial(pack_examples, capacity=5), batched=True)
    assert sum(len(r) for r in out.with_format(None)["example_ids"]) == 3


def test_streaming_packs_each_bounded_pool():
    ds = datasets.Dataset.from_dict({"input_ids": token_lists(np.arange(1, 26) % 7 + 1)}).to_iterable_dataset()
    rows = list(pack_iterable(ds, 10, pool_size=8))
    ids = [i for r in rows for i in r["example_ids"]]
    assert sorted(ids) == list(range(25))
    # a row never mixes examples from two pools
    assert all(len({i // 8 for i in r["example_ids"]}) == 1 for r in rows)


def test_streaming_output_feeds_an_iterable_dataset():
    source = datasets.Dataset.from_dict({"input_ids": token_lists([3, 5, 2, 6])}).to_iterable_dataset()
    ds = datasets.IterableDataset.from_generator(lambda: pack_iterable(source, 8, pool_size=2))
    assert sum(len(r["example_ids"]) for r in ds) == 4


def test_truncation_is_counted_and_keeps_the_chosen_end():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6], [7, 8]]})
    packed = pack_dataset(ds, 4, overflow="truncate_left")
    stats = pack_stats(packed, 4)
    assert stats.num_truncated_examples == 1 and stats.num_truncated_tokens == 2
    assert [3, 4, 5, 6] in packed["input_ids"]
    assert [1, 2, 3, 4] in pack_dataset(ds, 4, overflow="truncate_right")["input_ids"]


def test_over_long_example_error_names_the_example_and_the_limit():
    ds = datasets.Dataset.from_dict({"input_ids": [[1], [1] * 9]})
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens but capacity is 8 .*pass overflow="):
        pack_dataset(ds, 8)


def test_empty_example_error_names_the_example():
    ds = datasets.Dataset.from_dict({"input_ids": [[1], [2], []]})
    with pytest.raises(ValueError, match="example 2 has an empty token list"):
        pack_dataset(ds, 8)


def test_missing_example_error_names_the_example():
    ds = datasets.Dataset.from_dict({"input_ids": [[1], None, [2]]})
    with pytest.raises(ValueError, match=r"example 1 has no token list \(None\)"):
        pack_dataset(ds, 8)


def test_unknown_column_error_lists_the_columns():
    ds = datasets.Dataset.from_dict({"tokens": [[1]], "text": ["a"]})
    with pytest.raises(ValueError, match=r"column 'input_ids' not found; available columns: \['tokens', 'text'\]"):
        pack_dataset(ds, 8)


def test_collated_rows_are_the_flash_varlen_kwargs_of_data_collator_with_flattening():
    from transformers import DataCollatorWithFlattening

    seqs = token_lists([3, 5, 2])
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), 16)
    mine = to_flash_kwargs(list(packed))
    order = [i for r in packed for i in r["example_ids"]]
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(
        [{"input_ids": seqs[i]} for i in order]
    )
    for key in ("input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(mine[key].to(theirs[key].dtype), theirs[key]), key
    assert mine["max_length_q"] == theirs["max_length_q"]


def summed_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


def test_packed_training_step_gives_the_loss_and_gradients_of_each_sequence_alone():
    seqs = token_lists([7, 3, 12, 5, 9])
    model = build("llama").train()
    model.config.attention_dropout = 0.0
    alone = sum(summed_loss(model(torch.tensor([s])).logits[0], torch.tensor(s)) for s in seqs)
    alone.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    batch = to_flash_kwargs(list(pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), 64)))
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    labels = batch.pop("labels")
    logits = model(**batch).logits[0]
    loss = summed_loss(logits, labels[0])
    loss.backward()
    torch.testing.assert_close(loss, alone, atol=1e-4, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_naive_packing_without_restarts_or_masks_gives_a_different_loss():
    seqs = token_lists([7, 3, 12, 5, 9])
    model = build("llama").eval()
    with torch.no_grad():
        alone = sum(summed_loss(model(torch.tensor([s])).logits[0], torch.tensor(s)) for s in seqs)
        batch = to_flash_kwargs(list(pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), 64)))
        naive = summed_loss(model(batch["input_ids"]).logits[0], batch["labels"][0])  # plain causal, positions 0..T-1
    assert abs(naive.item() - alone.item()) > 1e-2


def test_non_positive_capacity_is_rejected():
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        pack_dataset([[1, 2]], 0)


def test_an_existing_labels_column_is_packed_alongside():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]]})
    row = pack_dataset(ds, 8)[0]
    assert sorted(zip(row["input_ids"], row["labels"])) == [(5, -100), (6, 6), (7, 7), (8, -100), (9, 9)]
