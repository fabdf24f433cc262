"""TRL's packing strategies through prepack: the same sequences as ``trl.pack_dataset``, in no more rows.

TRL 1.16's ``pack_dataset`` is the oracle: ``strategy="bfd"`` is ``overflow="truncate_right"``,
``"bfd_split"`` is ``overflow="split"``, ``"wrapped"`` is ``algorithm="wrapped"``.
"""

from collections import Counter

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.data_utils import pack_dataset as trl_pack_dataset

from prepack import pack_dataset, pack_examples, pack_iterable

STRATEGIES = {"bfd": dict(overflow="truncate_right"), "bfd_split": dict(overflow="split"), "wrapped": dict(algorithm="wrapped")}


def examples(lengths, seed=0, mask=True):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 1000, n).tolist() for n in lengths]
    columns = {"input_ids": ids}
    if mask:  # a per-token column, as chat data carries: it must travel with its tokens
        columns["assistant_masks"] = [rng.integers(0, 2, n).tolist() for n in lengths]
    return datasets.Dataset.from_dict(columns)


def sequences(rows, whole_rows=False):
    """The (tokens, mask) of every sequence of packed rows, as a multiset; TRL's wrapped rows are one sequence each
    (``whole_rows``: compare prepack's wrapped rows, whose pieces TRL does not record, row by row)."""
    out = Counter()
    for row in rows:
        bounds = np.cumsum([0, *([len(row["input_ids"])] if whole_rows else row.get("seq_lengths", [len(row["input_ids"])]))])
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[(tuple(row["input_ids"][a:b]), tuple(row.get("assistant_masks", [])[a:b]))] += 1
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=30), st.integers(3, 20))
@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_bfd_strategies_give_trls_sequences_in_no_more_rows(strategy, lengths, capacity):
    ds = examples(lengths)
    want = list(trl_pack_dataset(ds, capacity, strategy=strategy))
    got = list(pack_dataset(ds, capacity, **STRATEGIES[strategy]))
    assert sequences(got) == sequences(want)
    assert len(got) <= len(want)
    assert all(len(r["input_ids"]) <= capacity for r in got)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=30), st.integers(3, 20))
def test_wrapped_gives_trls_rows_with_each_examples_pieces_kept_apart(lengths, capacity):
    ds = examples(lengths)
    want = list(trl_pack_dataset(ds, capacity, strategy="wrapped"))
    got = list(pack_dataset(ds, capacity, algorithm="wrapped"))
    assert [r["input_ids"] for r in got] == [r["input_ids"] for r in want]
    assert [r["assistant_masks"] for r in got] == [r["assistant_masks"] for r in want]
    # the boundaries inside each row are TRL's row cuts and the examples' own ends, nothing else
    ends = set(np.cumsum(lengths).tolist())
    at = 0
    for r in got:
        cuts = at + np.cumsum(r["seq_lengths"])
        assert set(cuts[:-1].tolist()) <= ends
        assert cuts[-1] == at + len(r["input_ids"])
        at = int(cuts[-1])


def test_bfd_split_records_each_piece_under_its_example_in_order():
    ds = examples([9, 2], mask=False)
    rows = list(pack_dataset(ds, 4, overflow="split", schema="full"))
    pieces = {}
    for r in rows:
        bounds = np.cumsum([0, *r["seq_lengths"]])
        for e, a, b in zip(r["example_ids"], bounds[:-1], bounds[1:]):
            pieces.setdefault(e, []).append(r["input_ids"][a:b])
    assert sorted(map(len, pieces[0])) == [1, 4, 4] and all(t == 0 for r in rows for t in r["truncated"])
    # reassembling the pieces in stream order gives the example back: first pieces are capacity long
    whole = sorted(pieces[0], key=len, reverse=True)
    assert sum(whole, []) == ds[0]["input_ids"]


def test_trl_3887_rows_of_8192_n_plus_1_tokens_are_packed():
    # TRL #3887: a capacity of 8192·n + 1 packed nothing (one example per row)
    lengths = [100] * 200
    for capacity in (8193, 16385):
        got = pack_dataset(examples(lengths, mask=False), capacity, overflow="truncate_right")
        assert len(got) == -(-sum(lengths) // capacity)
        assert len(got) <= len(trl_pack_dataset(examples(lengths, mask=False), capacity, strategy="bfd"))


def test_trl_4554_no_token_is_lost_with_split():
    # TRL #4554: over-long examples lost their overflow; bfd_split keeps every token and every mask value
    ds = examples([50, 3, 17, 8, 33])
    rows = list(pack_dataset(ds, 16, overflow="split"))
    assert Counter(t for r in rows for t in r["input_ids"]) == Counter(t for e in ds["input_ids"] for t in e)
    assert sum(len(r["input_ids"]) for r in rows) == 111
    assert sequences(rows) == sequences(trl_pack_dataset(ds, 16, strategy="bfd_split"))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_trl_5075_chat_masks_stay_with_their_tokens_across_map_batches(strategy):
    # TRL #5075: chat data (input_ids + assistant_masks) packed in several map batches, whose tables are slices
    ds = examples([int(n) for n in np.random.default_rng(1).integers(1, 40, 60)], seed=1)
    want = trl_pack_dataset(ds, 32, strategy=strategy, map_kwargs={"batch_size": 16})
    got = ds.with_format("arrow").map(
        pack_examples, batched=True, batch_size=16, remove_columns=ds.column_names,
        fn_kwargs={"capacity": 32, **STRATEGIES[strategy]},
    ).with_format(None)
    whole = strategy == "wrapped"
    assert sequences(got, whole) == sequences(want)
    assert len(got) <= len(want)
    assert sequences(pack_dataset(ds, 32, pool_size=16, **STRATEGIES[strategy]), whole) == sequences(want)


def test_split_streams_like_the_whole_dataset_within_a_pool():
    ds = examples([9, 2, 30, 5], mask=False)
    streamed = list(pack_iterable(iter(ds), 8, overflow="split", pool_size=None))
    assert sequences(streamed) == sequences(pack_dataset(ds, 8, overflow="split"))


def test_wrapped_refuses_overflow_and_max_per_row():
    with pytest.raises(ValueError, match='algorithm="wrapped" cuts examples at row boundaries itself'):
        pack_dataset(examples([3]), 4, algorithm="wrapped", overflow="truncate_right")
    with pytest.raises(ValueError, match="takes no max_per_row"):
        pack_dataset(examples([3]), 4, algorithm="wrapped", max_per_row=2)
