"""The data-pipeline path: a dataset of token lists -> a dataset of packed training rows.

Lengths come straight from the Arrow column (no Python object per example),
:func:`prepack.plan` places every example, and the output rows are cut out of
the flat token buffer with numpy index arithmetic. This module holds the
``datasets`` and streaming fronts; every front validates its options once into a
:class:`prepack.data.packer.PackOptions` and goes through one packer,
:func:`prepack.data.packer.pack_table` (Arrow in and out: :mod:`prepack.data.arrow`):

* :func:`pack_dataset` runs it through ``Dataset.map`` over the whole dataset
  (one plan, at the L2 bound) or over ``pool_size`` chunks, split by split for a
  ``DatasetDict``, with ``map``'s fingerprint cache;
* :func:`pack_examples` is the same ``Dataset.map(batched=True)`` function, for
  your own ``map`` call;
* :func:`pack_iterable` streams: it packs a bounded pool of examples at a time;
  :func:`pack_iterable_dataset` wraps it as a ``datasets.IterableDataset``;
* :func:`prepack.ray_data.pack_ray_dataset` runs it as a Ray Data stage.

Two output schemas (S = sequences in a row, L = tokens in the row: their sum
without padding, ``capacity`` with ``pad_id``). ``"lean"`` (the default, TRL's
layout) stores only what cannot be rebuilt; the collator
(:class:`prepack.collate.DataCollatorForPackedRows`) rebuilds position ids,
labels and ``cu_seqlens`` from ``seq_lengths`` at batch time::

    input_ids     (L,)     the sequences back to back; int32 when every id fits, else the source dtype
    seq_lengths   (S,)     int32, tokens of each sequence, in row order

``"full"`` stores every quantity of the layout, for readers that want them
precomputed (and for ``Trainer(remove_unused_columns=True)``, which keeps
``position_ids`` but drops ``seq_lengths``)::

    labels        (L,)     input_ids (or the source's ``labels``), -100 on each
                           sequence's first token and on padding
    position_ids  (L,)     int32, restarting at 0 for each sequence, 0 on padding
    cu_seqlens    (S + 1,) int32, ``[0, l0, l0 + l1, ...]``
    example_ids   (S,)     int64, each sequence's index in the source
    truncated     (S,)     int32, tokens ``overflow`` cut from each sequence

Other source columns, in both schemas:

* a list column (``labels``, ``attention_mask``, ``completion_mask``, ...) must
  have one value per token of each example; it is packed alongside
  ``input_ids`` with its values unchanged (``"full"`` sets ``labels`` to -100
  at sequence starts, as documented above);
* a scalar column (``text``, an id, a score) cannot be spread over tokens:
  ``scalar_columns="drop"`` (default) drops it with a warning that names it,
  ``"keep"`` stores it per sequence, an (S,) list in row order like
  ``seq_lengths``, and ``"error"`` raises.

pyarrow (and ``datasets`` for :func:`pack_dataset`) are imported when called,
so ``import prepack`` works without them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arrow
from .packer import (
    FULL_COLUMNS,
    IGNORE_INDEX,
    LEAN_COLUMNS,
    SCALAR_COLUMNS,
    SCHEMAS,
    Algorithm,
    Overflow,
    PackOptions,
    ScalarColumns,
    Schema,
    check_pool_size,
    log_cuts,
    pack_table,
    pack_with_cuts,
)
from ..planner.bins import lower_bound_l2
from .stream import PackedStream

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

__all__ = [
    "FULL_COLUMNS",
    "IGNORE_INDEX",
    "LEAN_COLUMNS",
    "SCALAR_COLUMNS",
    "SCHEMAS",
    "PackOptions",
    "PackStats",
    "ScalarColumns",
    "Schema",
    "pack_dataset",
    "pack_examples",
    "pack_iterable",
    "pack_iterable_dataset",
    "pack_stats",
    "pack_table",
]


@dataclass(frozen=True)
class PackStats:
    """What packing did, computed from the packed columns by :func:`pack_stats`.

    Attributes:
        num_examples: sequences in the packed data (every source example, once).
        num_rows: packed rows.
        num_tokens: real tokens kept (padding not counted).
        capacity: tokens per row.
        num_truncated_examples: examples that ``overflow`` shortened; None when the rows do not
            record it (the lean schema: truncation is logged when it happens).
        num_truncated_tokens: tokens ``overflow`` cut off; None likewise.
        lower_bound_l2: the Martello-Toth bound: no packing of these lengths
            into rows of ``capacity`` uses fewer rows.
    """

    num_examples: int
    num_rows: int
    num_tokens: int
    capacity: int
    num_truncated_examples: int | None
    num_truncated_tokens: int | None
    lower_bound_l2: int

    @property
    def efficiency(self) -> float:
        """num_tokens / (num_rows * capacity): 1.0 means every row is full."""
        return self.num_tokens / max(1, self.num_rows * self.capacity)

    @property
    def gap_to_l2(self) -> float:
        """num_rows / lower_bound_l2 - 1: 0.0 means no packing could use fewer rows."""
        return self.num_rows / max(1, self.lower_bound_l2) - 1


def pack_dataset(
    data: datasets.Dataset | datasets.DatasetDict | Mapping[str, Sequence] | Sequence[Sequence[int]],
    capacity: int,
    column: str = "input_ids",
    *,
    schema: Schema = "lean",
    scalar_columns: ScalarColumns = "drop",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pool_size: int | None = None,
    pad_id: int | None = None,
    max_per_row: int | None = None,
    num_proc: int | None = None,
    load_from_cache_file: bool | None = None,
) -> datasets.Dataset | datasets.DatasetDict:
    """Pack a whole dataset of token lists into rows of at most ``capacity`` tokens.

    Runs :func:`pack_examples` through ``Dataset.map(batched=True)`` with the
    whole dataset as one batch (or ``pool_size`` examples per batch), so the
    plan sees every example and rows are as full as the lengths allow, and a
    dataset with cache files (``load_dataset``, ``load_from_disk``) gets
    ``map``'s cache: packing the same data with the same arguments again loads
    the packed rows instead of recomputing them.

    Args:
        data: a ``datasets.Dataset``, a ``datasets.DatasetDict`` (each split is
            packed on its own), a dict of columns, or a list of token lists.
        capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row:
            the packer's options, see :class:`prepack.data.packer.PackOptions`.
        pool_size: plan over batches of this many consecutive examples instead of
            the whole dataset (shuffle first if the order is not random).
        num_proc: ``map``'s worker processes; each plans its shard (or each pool) on its own.
        load_from_cache_file: passed to ``map`` (None: datasets' default, use the cache).

    Returns:
        A ``datasets.Dataset`` (a ``DatasetDict`` for one) of packed rows in
        plan order (longest examples first with ``"bfd"``: shuffle before training).

    Raises:
        ValueError: naming the first bad example (missing or empty token list, a
            negative token id, too long with ``overflow="error"``, a list column
            whose length differs from its tokens, a column whose lists mix types)
            and, for a ``DatasetDict``, the split; an empty dataset or split; or
            the available columns when ``column`` is not one.
    """
    import datasets

    options = PackOptions(capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row)
    pool_size = check_pool_size(pool_size)
    if isinstance(data, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError(
            "pack_dataset needs a map-style Dataset; stream an IterableDataset with prepack.pack_iterable_dataset"
        )
    if isinstance(data, datasets.DatasetDict):
        if not data:
            raise ValueError("the DatasetDict has no splits: nothing to pack")
        packed = {}
        for name, split in data.items():
            try:
                packed[name] = _pack_split(split, options, pool_size, num_proc, load_from_cache_file)
            except ValueError as e:
                raise ValueError(f"split {name!r}: {e}") from e
        return datasets.DatasetDict(packed)
    if not isinstance(data, datasets.Dataset):
        data = arrow.in_memory_dataset(data, column)
    return _pack_split(data, options, pool_size, num_proc, load_from_cache_file)


def pack_examples(
    batch: Mapping[str, Sequence] | pa.Table,
    indices: Sequence[int] | None = None,
    *,
    capacity: int,
    column: str = "input_ids",
    schema: Schema = "lean",
    scalar_columns: ScalarColumns = "drop",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pad_id: int | None = None,
    max_per_row: int | None = None,
) -> dict[str, list] | pa.Table:
    """A ``Dataset.map(batched=True)`` function: one map batch of examples -> packed rows.

    :func:`pack_dataset` calls ``map`` with it for you; call it yourself for
    ``map`` options it does not pass::

        packed = ds.with_format("arrow").map(
            pack_examples, batched=True, batch_size=10_000, with_indices=True,
            remove_columns=ds.column_names, fn_kwargs={"capacity": 4096}, num_proc=4,
        ).with_format(None)

    ``remove_columns`` is needed because a batch of N examples becomes fewer
    rows. The arrow format skips Python objects; the default format works too.

    Args:
        batch: ``{column: N token lists, ...}`` or a ``pyarrow.Table``.
        indices: (N,) the examples' indices in the dataset (``with_indices=True``);
            without them ``example_ids`` and errors count from 0 in each batch.
        capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row:
            the packer's options, see :class:`prepack.data.packer.PackOptions`.

    Returns:
        The packed rows: a ``pyarrow.Table`` for a table batch, else a dict of lists.
    """
    options = PackOptions(capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row)
    return _pack_map_batch(batch, indices, options)


def pack_iterable(
    examples: Iterable[Mapping[str, Any] | Sequence[int]],
    capacity: int,
    column: str = "input_ids",
    *,
    pool_size: int = 10_000,
    schema: Schema = "lean",
    scalar_columns: ScalarColumns = "drop",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pad_id: int | None = None,
    max_per_row: int | None = None,
) -> PackedStream:
    """Stream packed rows from any iterable of examples, holding at most ``pool_size`` examples at a time.

    Each pool of ``pool_size`` consecutive examples is planned and packed on its
    own, so memory stays bounded and the first rows come out after one pool.
    The options are checked when it is called; examples are read as rows are taken.
    For a ``datasets.IterableDataset`` of packed rows, use :func:`pack_iterable_dataset`.

    Args:
        examples: dicts holding ``column`` (every example the same keys), or bare token lists.
        pool_size: examples planned together; larger pools fill rows better (None: the whole stream, unbounded).
        capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row:
            the packer's options, see :class:`prepack.data.packer.PackOptions`.

    Returns:
        A :class:`prepack.data.stream.PackedStream`: an iterator of dicts, one per packed row, with the columns
        listed in :mod:`prepack.data` (example numbers count from 0 across the whole stream), and
        ``state_dict()`` / ``load_state_dict()`` to resume it exactly where it was, the pool in flight included.
    """
    options = PackOptions(capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row)
    return PackedStream(examples, options, check_pool_size(pool_size))


def pack_iterable_dataset(
    examples: datasets.IterableDataset,
    capacity: int,
    column: str = "input_ids",
    *,
    pool_size: int = 10_000,
    schema: Schema = "lean",
    scalar_columns: ScalarColumns = "drop",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pad_id: int | None = None,
    max_per_row: int | None = None,
) -> datasets.IterableDataset:
    """A ``datasets.IterableDataset`` of packed rows, streamed from a ``datasets.IterableDataset`` of examples.

    The rows of :func:`pack_iterable`, through ``IterableDataset.from_generator``. That
    function pickles its arguments and cuts a list argument into one shard per item, so it
    is given the stream only as a ``datasets.IterableDataset`` (``load_dataset(...,
    streaming=True)``, ``Dataset.to_iterable_dataset()``, ``IterableDataset.from_generator(fn)``).

    Args:
        examples: a ``datasets.IterableDataset`` with a ``column`` of token lists.
        pool_size, capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row:
            as in :func:`pack_iterable`.

    Raises:
        TypeError: for anything but a ``datasets.IterableDataset``, saying what to pass instead
            (a list would be packed one example per row; a generator cannot be pickled).
    """
    import datasets

    options = PackOptions(capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row)
    pool_size = check_pool_size(pool_size)
    if not isinstance(examples, datasets.IterableDataset):
        raise TypeError(_not_a_stream(examples))
    return datasets.IterableDataset.from_generator(
        _stream_rows, gen_kwargs={"examples": examples, "options": options, "pool_size": pool_size}
    )


def _not_a_stream(examples) -> str:
    """Why ``examples`` cannot feed pack_iterable_dataset, and what to pass instead."""
    import datasets

    got = type(examples).__name__
    want = (
        "pass a datasets.IterableDataset (load_dataset(..., streaming=True), Dataset.to_iterable_dataset(), "
        "or IterableDataset.from_generator(fn) with fn the function that makes your generator)"
    )
    if isinstance(examples, (list, tuple)):
        return (
            f"pack_iterable_dataset got a {got}, which IterableDataset.from_generator would cut into one shard per "
            f"example (one example per row); {want}, or pack in-memory examples with prepack.pack_dataset"
        )
    if isinstance(examples, Iterator):
        return f"pack_iterable_dataset got a {got}, which IterableDataset.from_generator cannot pickle; {want}"
    if isinstance(examples, datasets.Dataset):
        return f"pack_iterable_dataset got a map-style Dataset; pack it with prepack.pack_dataset, or {want}"
    return f"pack_iterable_dataset got a {got}; {want}"


def pack_stats(packed: datasets.Dataset | Mapping[str, Sequence] | pa.Table, capacity: int) -> PackStats:
    """Summarise packed rows (from any of the packers, either schema) without Python objects per token.

    Args:
        packed: packed rows with a ``seq_lengths`` column (and ``truncated``, in the full schema).
        capacity: the capacity they were packed to.
    """
    import pyarrow.compute as pc

    table = arrow.to_table(packed, "seq_lengths")
    lengths = pc.list_flatten(table.column("seq_lengths")).to_numpy().astype(np.int64)
    truncated = pc.list_flatten(table.column("truncated")).to_numpy() if "truncated" in table.column_names else None
    return PackStats(
        num_examples=len(lengths),
        num_rows=table.num_rows,
        num_tokens=int(lengths.sum()),
        capacity=int(capacity),
        num_truncated_examples=None if truncated is None else int(np.count_nonzero(truncated)),
        num_truncated_tokens=None if truncated is None else int(truncated.sum()),
        lower_bound_l2=lower_bound_l2(lengths, capacity),
    )


def _pack_map_batch(batch, indices, options: PackOptions):
    """:func:`pack_examples` with its options validated: the function :func:`pack_dataset` maps."""
    import pyarrow as pa

    table = batch if isinstance(batch, pa.Table) else arrow.to_table(batch, options.column)
    ids = None if indices is None else np.asarray(indices, dtype=np.int64)
    packed, cuts = pack_with_cuts(table, options, example_ids=ids)
    log_cuts(cuts, options)
    return packed if isinstance(batch, pa.Table) else packed.to_pydict()


def _stream_rows(examples: Iterable, options: PackOptions, pool_size: int | None) -> Iterator[dict[str, list]]:
    """The rows of :func:`pack_iterable` as a generator, for ``IterableDataset.from_generator`` (which resumes it
    by running it again and skipping the rows it yielded: packing is deterministic, so the rows are the same)."""
    yield from PackedStream(examples, options, pool_size)


def _pack_split(
    ds: datasets.Dataset, options: PackOptions, pool_size: int | None, num_proc, load_from_cache_file
) -> datasets.Dataset:
    """One ``Dataset`` -> its packed rows: one plan per pool (the whole dataset without a pool).

    A dataset with cache files goes through ``map(_pack_map_batch)``, which writes the packed rows
    next to them and loads them on the next call with the same data and options. An in-memory
    dataset has nothing for ``map`` to cache (``datasets`` caches only datasets backed by files),
    so it is packed directly: ``map`` would copy every packed token once more through its writer.
    Both give the same rows.
    """
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    if ds.num_rows == 0:
        raise ValueError("the dataset is empty: nothing to pack")
    if options.column not in ds.column_names:
        raise ValueError(f"column {options.column!r} not found; available columns: {ds.column_names}")
    if ds.cache_files or num_proc:
        packed = ds.with_format("arrow").map(
            _pack_map_batch, batched=True, batch_size=pool_size, with_indices=True, remove_columns=ds.column_names,
            fn_kwargs={"options": options}, num_proc=num_proc, load_from_cache_file=load_from_cache_file,
            desc="Packing",
        )
    else:
        table, cuts = pack_with_cuts(ds.with_format("arrow")[:], options, pool_size=pool_size)
        log_cuts(cuts, options)
        # A random fingerprint: the default one would hash every packed token.
        packed = datasets.Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())
    return packed.with_format(ds.format["type"])
