"""Resumable packed streams: after a resume the packed rows are, bitwise, an uninterrupted run's.

The oracle is the same stream run without interruption.
"""

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prepack import pack_iterable, pack_iterable_dataset


def examples(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 100, int(k)).tolist(), "labels": rng.integers(0, 100, int(k)).tolist()}
            for k in rng.integers(1, 30, n)]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 80), st.sampled_from([1, 7, 16, None]), st.sampled_from(["error", "split"]))
def test_pack_iterable_resumed_at_any_row_continues_bitwise(cut, pool_size, overflow):
    data = examples()
    kwargs = dict(capacity=32, pool_size=pool_size, overflow=overflow if overflow == "split" else "truncate_right",
                  schema="full")
    whole = list(pack_iterable(data, **kwargs))
    cut = min(cut, len(whole))
    stream = pack_iterable(data, **kwargs)
    head = [next(stream) for _ in range(cut)]
    state = stream.state_dict()
    resumed = pack_iterable(data, **kwargs)  # a new process: the same source, read again
    resumed.load_state_dict(state)
    assert head + list(resumed) == whole


def test_a_source_with_state_dict_resumes_from_its_own_state_not_by_skipping():
    source = datasets.Dataset.from_list(examples()).to_iterable_dataset()
    whole = list(pack_iterable(source, 32, pool_size=16))
    stream = pack_iterable(source, 32, pool_size=16)
    head = [next(stream) for _ in range(11)]
    state = stream.state_dict()
    assert "source" in state and state["pool_start"] > 0
    fresh = datasets.Dataset.from_list(examples()).to_iterable_dataset()
    resumed = pack_iterable(fresh, 32, pool_size=16)
    resumed.load_state_dict(state)
    assert head + list(resumed) == whole


def test_a_state_saved_with_another_pool_size_is_refused():
    stream = pack_iterable(examples(), 32, pool_size=16)
    next(stream)
    with pytest.raises(ValueError, match="saved with pool_size=16, this stream has 8"):
        pack_iterable(examples(), 32, pool_size=8).load_state_dict(stream.state_dict())


@pytest.mark.parametrize("cut", [0, 5, 13])
def test_pack_iterable_dataset_resumes_through_datasets_state_dict(cut):
    source = datasets.Dataset.from_list(examples()).to_iterable_dataset()
    packed = pack_iterable_dataset(source, 32, pool_size=16)
    whole = list(packed)
    interrupted = pack_iterable_dataset(datasets.Dataset.from_list(examples()).to_iterable_dataset(), 32, pool_size=16)
    it = iter(interrupted)
    head = [next(it) for _ in range(cut)]
    state = interrupted.state_dict()
    again = pack_iterable_dataset(datasets.Dataset.from_list(examples()).to_iterable_dataset(), 32, pool_size=16)
    again.load_state_dict(state)
    assert head + list(again) == whole
