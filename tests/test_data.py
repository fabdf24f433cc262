"""prepack.data: whole-dataset packing for datasets pipelines and padding-free training."""

import functools
import os

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack
from prepack.collate import to_flash_kwargs
from prepack.data.fronts import (
    FULL_COLUMNS,
    LEAN_COLUMNS,
    pack_dataset,
    pack_examples,
    pack_iterable,
    pack_iterable_dataset,
    pack_stats,
)

from .models import build


def token_lists(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, n).tolist() for n in lengths]


def brute_force_row(seqs, example_ids):
    """The full-schema row holding these examples, built one token at a time: the oracle for packed rows."""
    row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": [], "cu_seqlens": [0]}
    for e in example_ids:
        for position, token in enumerate(seqs[e]):
            row["input_ids"].append(token)
            row["labels"].append(-100 if position == 0 else token)  # -100 where a sequence starts
            row["position_ids"].append(position)
        row["seq_lengths"].append(len(seqs[e]))
        row["cu_seqlens"].append(row["cu_seqlens"][-1] + len(seqs[e]))
    return row


def assert_packs_exactly(rows, seqs, capacity):
    """Every example in exactly one row, and every row (full schema) equal to its brute-force layout."""
    placed = sorted(e for row in rows for e in row["example_ids"])
    assert placed == list(range(len(seqs)))
    for row in rows:
        want = brute_force_row(seqs, row["example_ids"])
        assert {k: row[k] for k in want} == want  # list equality: lengths and every value
        assert row["truncated"] == [0] * len(row["example_ids"])
        assert len(row["input_ids"]) <= capacity


@st.composite
def examples(draw):
    capacity = draw(st.integers(4, 64))
    lengths = draw(st.lists(st.integers(1, capacity), min_size=1, max_size=40))
    return token_lists(lengths, draw(st.integers(0, 1000))), capacity


@settings(max_examples=60, deadline=None)
@given(examples(), st.booleans())
def test_every_example_appears_exactly_once_and_tokens_round_trip(data, padded):
    seqs, capacity = data
    packed = pack_dataset(
        datasets.Dataset.from_dict({"input_ids": seqs}), capacity, schema="full", pad_id=0 if padded else None
    )
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
    packed = pack_dataset(
        datasets.Dataset.from_dict({"input_ids": seqs}), capacity, schema="full", pad_id=0 if padded else None
    )
    for row in packed:
        starts = set(row["cu_seqlens"][:-1])
        real = row["cu_seqlens"][-1]
        for t, (tok, lab) in enumerate(zip(row["input_ids"], row["labels"])):
            assert lab == (-100 if t in starts or t >= real else tok)


@settings(max_examples=60, deadline=None)
@given(examples())
def test_position_ids_restart_and_cu_seqlens_match_seq_lengths(data):
    seqs, capacity = data
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), capacity, schema="full")
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
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": token_lists([3, 4, 7])}), 8, pad_id=9, schema="full")
    assert all(len(r["input_ids"]) == 8 for r in packed)
    for r in packed:
        real = r["cu_seqlens"][-1]
        assert r["input_ids"][real:] == [9] * (8 - real) and r["labels"][real:] == [-100] * (8 - real)


def test_dataset_map_batched_with_indices_and_two_processes():
    seqs = token_lists(np.arange(1, 41) % 13 + 1)
    ds = datasets.Dataset.from_dict({"input_ids": seqs, "text": ["x"] * 40})
    fn = functools.partial(pack_examples, capacity=16, schema="full", scalar_columns="error")
    out = ds.remove_columns("text").map(
        fn, batched=True, batch_size=10, with_indices=True, remove_columns=["input_ids"], num_proc=2
    )
    assert set(out.column_names) == set(FULL_COLUMNS)
    rows = list(out)
    assert_packs_exactly(rows, seqs, 16)
    # each map batch of 10 examples is planned alone: a row never mixes two batches
    assert all(len({e // 10 for e in row["example_ids"]}) == 1 for row in rows)


def test_map_function_accepts_arrow_batches():
    seqs = token_lists([2, 3, 4])
    ds = datasets.Dataset.from_dict({"input_ids": seqs}).with_format("arrow")
    out = ds.map(functools.partial(pack_examples, capacity=5, schema="full"), batched=True)
    assert_packs_exactly(list(out.with_format(None)), seqs, 5)


def test_streaming_packs_each_bounded_pool():
    seqs = token_lists(np.arange(1, 26) % 7 + 1)
    ds = datasets.Dataset.from_dict({"input_ids": seqs}).to_iterable_dataset()
    rows = list(pack_iterable(ds, 10, pool_size=8, schema="full"))
    assert_packs_exactly(rows, seqs, 10)
    # a row never mixes examples from two pools
    assert all(len({i // 8 for i in r["example_ids"]}) == 1 for r in rows)


def test_streaming_output_feeds_an_iterable_dataset():
    seqs = token_lists([3, 5, 2, 6])
    source = datasets.Dataset.from_dict({"input_ids": seqs}).to_iterable_dataset()
    ds = datasets.IterableDataset.from_generator(lambda: pack_iterable(source, 8, pool_size=2, schema="full"))
    assert_packs_exactly(list(ds), seqs, 8)


def test_pack_iterable_dataset_streams_the_rows_of_pack_iterable():
    seqs = token_lists(np.arange(1, 26) % 7 + 1, seed=3)
    source = datasets.Dataset.from_dict({"input_ids": seqs}).to_iterable_dataset()
    packed = pack_iterable_dataset(source, 10, pool_size=8, schema="full")
    assert isinstance(packed, datasets.IterableDataset)
    rows = list(packed)
    assert_packs_exactly(rows, seqs, 10)
    assert rows == list(pack_iterable(source, 10, pool_size=8, schema="full"))


def test_pack_iterable_dataset_refuses_a_list_and_says_what_to_pass():
    # IterableDataset.from_generator would cut a list into one shard per example: one example per row
    stream = [{"input_ids": [1, 2, 3]}] * 20
    with pytest.raises(TypeError, match=r"got a list, .*one shard per example.*pass a datasets\.IterableDataset"):
        pack_iterable_dataset(stream, 8)


def test_pack_iterable_dataset_refuses_a_generator_and_says_what_to_pass():
    stream = ({"input_ids": [1, 2, 3]} for _ in range(20))
    with pytest.raises(TypeError, match=r"got a generator, which .* cannot pickle; pass a datasets\.IterableDataset"):
        pack_iterable_dataset(stream, 8)


def test_pack_dataset_points_an_iterable_dataset_to_pack_iterable_dataset():
    source = datasets.Dataset.from_dict({"input_ids": [[1, 2]]}).to_iterable_dataset()
    with pytest.raises(TypeError, match="prepack.pack_iterable_dataset"):
        pack_dataset(source, 8)


def test_bad_options_are_refused_when_a_stream_is_made_not_when_it_is_read():
    with pytest.raises(ValueError, match=r"schema must be one of \('lean', 'full'\), got 'wide'"):
        pack_iterable([[1, 2]], 8, schema="wide")


def test_a_negative_pad_id_is_refused():
    with pytest.raises(ValueError, match=r"pad_id must be a token id \(an integer >= 0\) or None, got -1"):
        pack_dataset([[1, 2]], 8, pad_id=-1)


def test_truncation_is_counted_and_keeps_the_chosen_end():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6], [7, 8]]})
    packed = pack_dataset(ds, 4, overflow="truncate_left", schema="full")
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
    with pytest.raises(ValueError, match="example 2 has an empty list in column 'input_ids'"):
        pack_dataset(ds, 8)


def test_a_negative_token_id_names_the_example_and_the_value():
    # -100 belongs in labels; as a token id, prepack.pack refuses it too
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4], [5, -100, 6]]})
    with pytest.raises(ValueError, match=r"example 2 has a negative token id -100 in column 'input_ids'"):
        pack_dataset(ds, 8)


def test_a_negative_token_id_in_a_stream_is_named_by_its_number_in_the_stream():
    with pytest.raises(ValueError, match="example 3 has a negative token id -1 in column 'input_ids'"):
        list(pack_iterable([[1], [2], [3], [4, -1]], 8, pool_size=2))


def test_missing_example_error_names_the_example():
    ds = datasets.Dataset.from_dict({"input_ids": [[1], None, [2]]})
    with pytest.raises(ValueError, match=r"example 1 has no list in column 'input_ids' \(None\)"):
        pack_dataset(ds, 8)


def test_unknown_column_error_lists_the_columns():
    ds = datasets.Dataset.from_dict({"tokens": [[1]], "text": ["a"]})
    with pytest.raises(ValueError, match=r"column 'input_ids' not found; available columns: \['tokens', 'text'\]"):
        pack_dataset(ds, 8)


def test_non_positive_capacity_is_rejected():
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        pack_dataset([[1, 2]], 0)


def test_an_existing_labels_column_is_packed_alongside():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]]})
    row = pack_dataset(ds, 8)[0]
    assert sorted(zip(row["input_ids"], row["labels"])) == [(5, -100), (6, 6), (7, 7), (8, -100), (9, 9)]


# --- schemas -------------------------------------------------------------------------------------


def test_the_lean_schema_stores_only_input_ids_and_seq_lengths_in_int32():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]}).cast(
        datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"))})
    )
    packed = pack_dataset(ds, 8)
    assert packed.column_names == list(LEAN_COLUMNS)
    assert packed.features["input_ids"].feature.dtype == "int32"
    assert packed.features["seq_lengths"].feature.dtype == "int32"


def test_ids_that_do_not_fit_int32_keep_their_dtype():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 2**40], [8, 9]]})
    packed = pack_dataset(ds, 8)
    assert packed.features["input_ids"].feature.dtype == "int64"
    assert sorted(packed[0]["input_ids"]) == [5, 8, 9, 2**40]


@settings(max_examples=30, deadline=None)
@given(examples(), st.booleans())
def test_lean_and_full_rows_collate_to_the_same_batch(data, padded):
    seqs, capacity = data
    ds = datasets.Dataset.from_dict({"input_ids": seqs})
    pad = 0 if padded else None
    lean, full = (list(pack_dataset(ds, capacity, schema=s, pad_id=pad)) for s in ("lean", "full"))
    a, b = to_flash_kwargs(lean), to_flash_kwargs(full)
    for key in ("input_ids", "labels", "position_ids"):
        # full rows with padding collate pad tokens as one-token sequences, lean ones as one sequence
        real = a["labels"] != -100 if padded else slice(None)
        assert torch.equal(a[key][real], b[key][real]), key


# --- other columns -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(examples())
def test_every_list_column_travels_with_its_tokens(data):
    seqs, capacity = data
    marks = [[10 * i + t for t in range(len(s))] for i, s in enumerate(seqs)]
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs, "mark": marks}), capacity)
    for row in packed:
        assert len(row["mark"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lengths"]:
            i = row["mark"][start] // 10
            assert row["input_ids"][start : start + n] == seqs[i]
            assert row["mark"][start : start + n] == marks[i]
            start += n


def test_lean_rows_keep_the_label_values_of_the_source():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[1, 6, 7], [2, 9]]})
    row = pack_dataset(ds, 8)[0]
    assert sorted(zip(row["input_ids"], row["labels"])) == [(5, 1), (6, 6), (7, 7), (8, 2), (9, 9)]


def test_scalar_columns_are_dropped_with_a_warning_naming_them():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6], [7]], "text": ["a", "b"], "score": [0.5, 1.0]})
    with pytest.warns(UserWarning, match=r"drops the non-list columns \['text', 'score'\]"):
        packed = pack_dataset(ds, 8)
    assert packed.column_names == list(LEAN_COLUMNS)


def test_scalar_columns_can_be_kept_one_value_per_sequence():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6], [7], [8, 9, 10]], "text": ["a", "b", "c"]})
    packed = pack_dataset(ds, 4, scalar_columns="keep", schema="full")
    for row in packed:
        assert row["text"] == ["abc"[i] for i in row["example_ids"]]


def test_scalar_columns_can_be_refused():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6]], "text": ["a"]})
    with pytest.raises(ValueError, match=r"columns \['text'\] are not lists"):
        pack_dataset(ds, 8, scalar_columns="error")


def test_columns_the_packer_writes_are_refused():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6]], "seq_lengths": [[2]]})
    with pytest.raises(ValueError, match="column 'seq_lengths' is one the packer writes"):
        pack_dataset(ds, 8)


# --- DatasetDict and the map cache ---------------------------------------------------------------


def test_a_dataset_dict_is_packed_split_by_split():
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"input_ids": token_lists([3, 5, 2, 6])}),
        "test": datasets.Dataset.from_dict({"input_ids": token_lists([4, 4], seed=1)}),
    })
    packed = pack_dataset(dd, 8)
    assert set(packed) == {"train", "test"}
    assert sum(len(r) for r in packed["train"]["seq_lengths"]) == 4
    assert sum(len(r) for r in packed["test"]["seq_lengths"]) == 2


def test_an_empty_split_is_named():
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]}),
        "validation": datasets.Dataset.from_dict({"input_ids": [[1]]}).select([]),
    })
    with pytest.raises(ValueError, match="split 'validation': the dataset is empty"):
        pack_dataset(dd, 8)


def test_an_error_in_a_split_names_the_split_and_the_example():
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]}),
        "test": datasets.Dataset.from_dict({"input_ids": [[1], [1] * 9]}),
    })
    with pytest.raises(ValueError, match="split 'test': example 1 has 9 tokens but capacity is 8"):
        pack_dataset(dd, 8)


def test_packing_the_same_files_again_loads_the_map_cache(tmp_path):
    source = datasets.Dataset.from_dict({"input_ids": token_lists(np.arange(1, 60) % 11 + 1), "text": ["x"] * 59})
    source.save_to_disk(tmp_path / "source")
    ds = datasets.load_from_disk(tmp_path / "source")
    with pytest.warns(UserWarning):
        first = pack_dataset(ds, 16, schema="full")
    cache = first.cache_files[0]["filename"]
    written = os.stat(cache)
    again = pack_dataset(datasets.load_from_disk(tmp_path / "source"), 16, schema="full")
    assert again.cache_files[0]["filename"] == cache
    assert os.stat(cache).st_mtime_ns == written.st_mtime_ns  # loaded, not rewritten
    # the map path (files) and the direct path (memory) give the same rows
    in_memory = pack_dataset(source.remove_columns("text"), 16, schema="full")
    assert again[:] == in_memory[:]


# --- bad input -----------------------------------------------------------------------------------


def test_a_column_whose_lists_mix_types_names_the_example():
    with pytest.raises(ValueError, match="column 'input_ids' mixes types: example 2 holds lists of str"):
        pack_dataset({"input_ids": [[1, 2], [3], ["a", "b"]]}, 8)


def test_ints_mixed_with_floats_name_the_example():
    with pytest.raises(ValueError, match="column 'input_ids' mixes types: example 1 holds lists of float"):
        pack_dataset({"input_ids": [[1, 2], [3.5]]}, 8)


def test_a_streamed_column_whose_lists_mix_types_names_the_example():
    stream = [{"input_ids": [1, 2], "mask": [1, 1]}] * 3 + [{"input_ids": [3, 4], "mask": ["x", "y"]}]
    with pytest.raises(ValueError, match="column 'mask' mixes types: example 3 holds lists of str"):
        list(pack_iterable(stream, 8, pool_size=10))


def test_labels_whose_length_differs_from_input_ids_name_the_example():
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[5, 6, 7], [9]]})
    with pytest.raises(ValueError, match="example 1 has 2 tokens but 1 values in column 'labels'"):
        pack_dataset(ds, 8)
