"""A resumable stream of packed rows: what :func:`prepack.pack_iterable` returns.

Examples are read ``pool_size`` at a time; each pool is planned and packed on its own, and its rows
are handed out one by one. :meth:`PackedStream.state_dict` records where the stream is: the examples
read before the pool in flight, the rows of that pool already handed out, and the source's own
``state_dict()`` as it was when that pool was read (when the source has one, as a
``datasets.IterableDataset`` does). Packing a pool is deterministic, so a stream given that state
re-reads the pool in flight, packs it again and continues with its next row: the rows after a resume
are, bitwise, the rows an uninterrupted run gives, and nothing is lost or repeated (torchtune and
torchtitan lost the buffer in flight at a resume). A source without ``state_dict`` must give the same
examples again from its start (a list, a file reader); the examples before the pool are skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from . import arrow
from .packer import PackOptions, log_truncation, pack_with_cuts


class PackedStream(Iterator[dict]):
    """Packed rows from an iterable of examples, one pool at a time; resumable with ``state_dict``.

    Args:
        examples: dicts holding ``options.column`` (or bare token lists).
        options: how to pack.
        pool_size: examples planned together (None: the whole stream).
    """

    def __init__(self, examples: Iterable, options: PackOptions, pool_size: int | None):
        self._examples, self._options, self._pool_size = examples, options, pool_size
        self._source: Iterator | None = None
        self._rows: list[dict] = []  # the pool in flight, packed
        self._pool_start = 0  # examples read before the pool in flight
        self._next_start = 0  # examples read so far
        self._pool_len = 0
        self._done = 0  # its rows handed out
        self._source_state: Any = None  # the source's state_dict() before the pool in flight was read
        self._cut_examples = self._cut_tokens = 0
        self._resume: Mapping | None = None

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> dict:
        if self._source is None:
            self._start()
        while self._done >= len(self._rows):
            if not self._read_pool():
                log_truncation(self._cut_examples, self._pool_start, self._cut_tokens, self._options, who="pack_iterable ")
                raise StopIteration
        self._done += 1
        return self._rows[self._done - 1]

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (plain ints and the source's own state): load it into a new stream over the same source."""
        if self._resume is not None:  # loaded and not started yet: the state is the loaded one
            return dict(self._resume)
        state = {"pool_start": self._pool_start, "rows_done": self._done, "pool_size": self._pool_size,
                 "cut_examples": self._cut_examples, "cut_tokens": self._cut_tokens}
        if self._source_state is not None:
            state["source"] = self._source_state
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`, before the first row is taken; refuses another ``pool_size``."""
        if self._source is not None:
            raise ValueError("load_state_dict must be called before the stream's first row is taken")
        if state["pool_size"] != self._pool_size:
            raise ValueError(f"the stream state was saved with pool_size={state['pool_size']}, this stream has {self._pool_size}")
        self._resume = dict(state)

    def _start(self) -> None:
        state, self._resume = self._resume, None
        if state is not None and "source" in state:
            if not hasattr(self._examples, "load_state_dict"):
                raise ValueError("the stream state holds its source's state_dict, but this source has no load_state_dict")
            self._examples.load_state_dict(state["source"])
        self._source = iter(self._examples)
        if state is None:
            return
        if "source" not in state:  # a source without state: skip what was read before the pool in flight
            skipped = sum(1 for _ in itertools.islice(self._source, state["pool_start"]))
            if skipped < state["pool_start"]:
                raise ValueError(f"the source ended after {skipped} examples, before the saved position {state['pool_start']}")
        self._pool_start = self._next_start = state["pool_start"]
        self._cut_examples, self._cut_tokens = state["cut_examples"], state["cut_tokens"]
        if state["rows_done"]:  # the pool in flight, packed again: skip its rows handed out already
            self._read_pool(count_cuts=False)
            self._done = state["rows_done"]

    def _read_pool(self, count_cuts: bool = True) -> bool:
        start = self._next_start
        state = self._examples.state_dict() if hasattr(self._examples, "state_dict") else None
        pool = list(itertools.islice(self._source, self._pool_size))
        if not pool:
            self._pool_start = start
            return False
        column = self._options.column
        table = arrow.to_table(arrow.pool_columns(pool, column, start), column, first_id=start)
        ids = np.arange(start, start + len(pool), dtype=np.int64)
        table, cuts = pack_with_cuts(table, self._options, example_ids=ids)
        if count_cuts:
            self._cut_examples += int(np.count_nonzero(cuts))
            self._cut_tokens += int(cuts.sum())
        self._rows, self._done = table.to_pylist(), 0
        self._pool_start, self._next_start, self._source_state = start, start + len(pool), state
        return True
