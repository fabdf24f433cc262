"""The data-pipeline path: a dataset of token lists -> a dataset of packed training rows.

Lengths come straight from the Arrow column (no Python object per example),
:func:`prepack.plan` places every example, and the output rows are cut out of
the flat token buffer with numpy index arithmetic. Every entry point goes
through one packer, :func:`pack_table`:

* :func:`pack_dataset` runs it through ``Dataset.map`` over the whole dataset
  (one plan, at the L2 bound) or over ``pool_size`` chunks, split by split for a
  ``DatasetDict``, with ``map``'s fingerprint cache;
* :func:`pack_examples` is the same ``Dataset.map(batched=True)`` function, for
  your own ``map`` call;
* :func:`pack_iterable` streams: it packs a bounded pool of examples at a time;
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

import itertools
import logging
import mmap
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import layout
from .packing import Overflow, check_overflow
from .planner import Algorithm, check_capacity, lower_bound_l2, plan

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

logger = logging.getLogger(__name__)

Schema = Literal["lean", "full"]
ScalarColumns = Literal["drop", "keep", "error"]
SCHEMAS: tuple[str, ...] = ("lean", "full")
SCALAR_COLUMNS: tuple[str, ...] = ("drop", "keep", "error")
IGNORE_INDEX = -100  # what transformers' cross-entropy skips
LEAN_COLUMNS: tuple[str, ...] = ("input_ids", "seq_lengths")
FULL_COLUMNS: tuple[str, ...] = (
    "input_ids", "labels", "position_ids", "seq_lengths", "cu_seqlens", "example_ids", "truncated",
)
# Names the packer writes; a source column with one of them would be overwritten.
_WRITTEN = frozenset(FULL_COLUMNS) - {"labels"}

# Gather tokens in slices of about this many: the int64 index of a slice (1 MiB) stays under
# numpy's huge-page size and is reused from the heap, so a gather faults in no memory but its output.
_GATHER_CHUNK = 1 << 17
# Token columns at least this large are allocated as a plain anonymous mapping; see _empty.
_MMAP_BYTES = 1 << 26


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
        capacity: tokens per row.
        column: the column of token-id lists (N lists, integer dtype); it is
            written as ``input_ids``.
        schema: ``"lean"`` (default) or ``"full"``: the columns listed in :mod:`prepack.data`.
        scalar_columns: what to do with columns that are not lists: ``"drop"``
            (default, with a warning naming them), ``"keep"`` (one value per
            sequence, like ``seq_lengths``) or ``"error"``.
        algorithm: see :func:`prepack.plan`.
        overflow: an example longer than ``capacity``: ``"error"`` (default)
            raises, ``"truncate_left"`` keeps its last ``capacity`` tokens,
            ``"truncate_right"`` its first. Cuts are logged, and recorded in the
            ``truncated`` column of the full schema; see :func:`pack_stats`.
        pool_size: plan over batches of this many consecutive examples instead of
            the whole dataset (shuffle first if the order is not random).
        pad_id: ``None`` (default) gives padding-free rows of varying length;
            an int pads every row to ``capacity`` with it (labels -100, position
            0, other list columns 0 on padding).
        max_per_row: at most this many examples per row.
        num_proc: ``map``'s worker processes; each plans its shard (or each pool) on its own.
        load_from_cache_file: passed to ``map`` (None: datasets' default, use the cache).

    Returns:
        A ``datasets.Dataset`` (a ``DatasetDict`` for one) of packed rows in
        plan order (longest examples first with ``"bfd"``: shuffle before training).

    Raises:
        ValueError: naming the first bad example (missing or empty token list,
            too long with ``overflow="error"``, a list column whose length
            differs from its tokens, a column whose lists mix types) and, for a
            ``DatasetDict``, the split; an empty dataset or split; or the
            available columns when ``column`` is not one.
    """
    import datasets

    capacity = check_capacity(capacity)
    _check_options(schema, scalar_columns, overflow, pool_size)
    options = dict(
        capacity=capacity, column=column, schema=schema, scalar_columns=scalar_columns, algorithm=algorithm,
        overflow=overflow, pad_id=pad_id, max_per_row=max_per_row,
    )
    if isinstance(data, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError("pack_dataset needs a map-style Dataset; stream an IterableDataset with prepack.pack_iterable")
    if isinstance(data, datasets.DatasetDict):
        if not data:
            raise ValueError("the DatasetDict has no splits: nothing to pack")
        packed = {}
        for name, split in data.items():
            try:
                packed[name] = _pack_split(split, pool_size, num_proc, load_from_cache_file, options)
            except ValueError as e:
                raise ValueError(f"split {name!r}: {e}") from e
        return datasets.DatasetDict(packed)
    if not isinstance(data, datasets.Dataset):
        data = _in_memory_dataset(data, column)
    return _pack_split(data, pool_size, num_proc, load_from_cache_file, options)


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
            as in :func:`pack_dataset`.

    Returns:
        The packed rows: a ``pyarrow.Table`` for a table batch, else a dict of lists.
    """
    import pyarrow as pa

    table = batch if isinstance(batch, pa.Table) else _arrow_table(batch, column)
    ids = None if indices is None else np.asarray(indices, dtype=np.int64)
    out = pack_table(
        table, capacity, column, example_ids=ids, schema=schema, scalar_columns=scalar_columns,
        algorithm=algorithm, overflow=overflow, pad_id=pad_id, max_per_row=max_per_row,
    )
    return out if isinstance(batch, pa.Table) else out.to_pydict()


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
) -> Iterator[dict[str, list]]:
    """Stream packed rows from any iterable of examples, holding at most ``pool_size`` examples at a time.

    Each pool of ``pool_size`` consecutive examples is planned and packed on its
    own, so memory stays bounded and the first rows come out after one pool.
    Works on a ``datasets.IterableDataset`` and as its generator::

        packed = IterableDataset.from_generator(
            pack_iterable, gen_kwargs={"examples": stream, "capacity": 4096, "pool_size": 10_000})

    Args:
        examples: dicts holding ``column`` (every example the same keys), or bare token lists.
        pool_size: examples planned together; larger pools fill rows better.
        capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row:
            as in :func:`pack_dataset`.

    Yields:
        One dict per packed row, with the columns listed in :mod:`prepack.data`;
        example numbers (``example_ids``, errors) count from 0 across the whole stream.
    """
    capacity = check_capacity(capacity)
    _check_options(schema, scalar_columns, overflow, pool_size)
    it = iter(examples)
    start = cut_examples = cut_tokens = 0
    while pool := list(itertools.islice(it, pool_size)):
        table = _arrow_table(_pool_columns(pool, column, start), column, first_id=start)
        table, cuts = _pack_with_cuts(
            table, capacity, column, example_ids=np.arange(start, start + len(pool), dtype=np.int64), schema=schema,
            scalar_columns=scalar_columns, algorithm=algorithm, overflow=overflow, pool_size=None, pad_id=pad_id,
            max_per_row=max_per_row, log=False,
        )
        cut_examples += int(np.count_nonzero(cuts))
        cut_tokens += int(cuts.sum())
        start += len(pool)
        yield from table.to_pylist()
    if cut_tokens:
        logger.warning(f"pack_iterable truncated {cut_examples} of {start} examples ({cut_tokens} tokens) to capacity {capacity}")


def pack_stats(packed: datasets.Dataset | Mapping[str, Sequence] | pa.Table, capacity: int) -> PackStats:
    """Summarise packed rows (from any of the packers, either schema) without Python objects per token.

    Args:
        packed: packed rows with a ``seq_lengths`` column (and ``truncated``, in the full schema).
        capacity: the capacity they were packed to.
    """
    import pyarrow.compute as pc

    table = _arrow_table(packed, "seq_lengths")
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


# --- the packer shared by every entry point --------------------------------------------------------


def pack_table(
    table: pa.Table,
    capacity: int,
    column: str = "input_ids",
    *,
    example_ids: np.ndarray | None = None,
    schema: Schema = "lean",
    scalar_columns: ScalarColumns = "drop",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pool_size: int | None = None,
    pad_id: int | None = None,
    max_per_row: int | None = None,
) -> pa.Table:
    """N examples (a ``pyarrow.Table``) -> a table of packed rows: the packer behind every entry point.

    Args:
        table: N rows; ``column`` holds the token lists, other columns are
            treated as described in :mod:`prepack.data`.
        example_ids: (N,) int64, the examples' names in errors and ``example_ids``
            (default ``arange(N)``).
        pool_size: plan each ``pool_size`` consecutive examples on its own (None: all N at once).
        capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row:
            as in :func:`pack_dataset`.

    Returns:
        The packed rows, in plan order.
    """
    capacity = check_capacity(capacity)
    _check_options(schema, scalar_columns, overflow, pool_size)
    packed, _ = _pack_with_cuts(
        table, capacity, column, example_ids=example_ids, schema=schema, scalar_columns=scalar_columns,
        algorithm=algorithm, overflow=overflow, pool_size=pool_size, pad_id=pad_id, max_per_row=max_per_row, log=True,
    )
    return packed


def _pack_with_cuts(
    table: pa.Table,
    capacity: int,
    column: str,
    *,
    example_ids: np.ndarray | None,
    schema: Schema,
    scalar_columns: ScalarColumns,
    algorithm: Algorithm,
    overflow: Overflow,
    pool_size: int | None,
    pad_id: int | None,
    max_per_row: int | None,
    log: bool,
) -> tuple[pa.Table, np.ndarray]:
    """:func:`pack_table`, also returning the (N,) tokens cut from each example (for a stream's running count)."""
    import pyarrow as pa

    ids = np.arange(table.num_rows, dtype=np.int64) if example_ids is None else np.asarray(example_ids, np.int64)
    if len(ids) != table.num_rows:
        raise ValueError(f"example_ids has {len(ids)} entries for {table.num_rows} examples")
    tokens_col, token_cols, scalar_cols = _split_columns(table, column, scalar_columns)
    lengths, values = _flat_lists(tokens_col, ids, f"column {column!r}")
    # Every list column travels with the tokens: (name, flat values), same offsets as the tokens.
    flat = {"input_ids": values}
    for name in token_cols:
        col_lengths, flat[name] = _flat_lists(table.column(name), ids, f"column {name!r}", allow_empty=True, numeric=False)
        bad = np.flatnonzero(col_lengths != lengths)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"example {ids[i]} has {lengths[i]} tokens but {col_lengths[i]} values in column {name!r}; "
                "a list column needs one value per token (remove the column first if it is not per token)"
            )

    C = capacity
    truncated = np.maximum(lengths - C, 0)
    if truncated.any():
        over = np.flatnonzero(truncated)
        if overflow == "error":
            layout.check_fits(
                lengths, C, what="example", ids=ids,
                hint='pass overflow="truncate_left" or "truncate_right", or raise capacity',
            )
        # Cut only the overflow: the index work is proportional to the tokens dropped, not to the dataset.
        cut_from = layout.starts(lengths)[over] + (0 if overflow == "truncate_left" else C)
        keep = np.ones(len(values), bool)
        keep[layout.ranges(cut_from, truncated[over])] = False
        flat = {name: v[keep] for name, v in flat.items()}
        lengths = lengths - truncated
        if log:
            logger.warning(
                f"truncated {len(over)} of {len(lengths)} examples ({int(truncated.sum())} tokens) "
                f"to capacity {C} ({overflow})"
            )

    order, row_counts = _plan_pools(lengths, C, pool_size, algorithm=algorithm, max_per_row=max_per_row)
    # A plan fills each row from offset 0 in (row, offset) order, so a row is
    # simply its examples in plan order, back to back.
    seq = lengths[order]
    starts = layout.starts(lengths)[order]  # where each packed example begins in the flat values
    row_ptr = np.concatenate([[0], np.cumsum(row_counts)])
    seq_first = layout.starts(seq)
    streams = {name: _gather(v, starts, seq, _narrow(v) if name in ("input_ids", "labels") else v.dtype)
               for name, v in flat.items()}
    if schema == "full":
        labels = streams.get("labels", streams["input_ids"])
        # a signed dtype, so -100 fits; a copy when labels are the tokens themselves
        labels = labels.astype(np.promote_types(labels.dtype, np.int8), copy="labels" not in streams)
        # Labels are unshifted (the model shifts them): -100 on a sequence's first
        # token stops the previous sequence's last token from learning to predict it.
        labels[seq_first] = IGNORE_INDEX
        streams["labels"] = labels
        streams["position_ids"] = layout.positions(seq, np.int32)

    tokens_per_row = np.add.reduceat(seq, row_ptr[:-1]) if len(seq) else np.zeros(0, np.int64)
    if pad_id is None:
        row_offsets = np.concatenate([[0], np.cumsum(tokens_per_row)])
    else:
        real = np.arange(C) < tokens_per_row[:, None]  # (R, C): rows are filled from the left
        fills = {"input_ids": pad_id, "labels": IGNORE_INDEX}
        streams = {name: _scatter(real, s, fills.get(name, 0), name) for name, s in streams.items()}
        row_offsets = np.arange(len(tokens_per_row) + 1, dtype=np.int64) * C

    columns = {name: _lists(row_offsets, s) for name, s in streams.items() if name != "position_ids"}
    if schema == "full":
        columns["position_ids"] = _lists(row_offsets, streams["position_ids"])
    columns["seq_lengths"] = _lists(row_ptr, seq.astype(np.int32))
    if schema == "full":
        # Each row's cu_seqlens is [0, running sum of its lengths]: one more entry than sequences.
        cu_ptr = row_ptr + np.arange(len(row_ptr))
        cu = np.zeros(len(seq) + len(row_counts), np.int32)
        is_head = np.zeros(len(cu), bool)
        is_head[cu_ptr[:-1]] = True
        cu[~is_head] = seq_first + seq - np.repeat(seq_first[row_ptr[:-1]], row_counts)
        columns["cu_seqlens"] = _lists(cu_ptr, cu)
        columns["example_ids"] = _lists(row_ptr, ids[order])
        columns["truncated"] = _lists(row_ptr, truncated[order].astype(np.int32))
    taken = pa.array(order)
    for name in scalar_cols:  # one value per sequence, in row order
        col = table.column(name).take(taken)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        columns[name] = pa.ListArray.from_arrays(pa.array(row_ptr.astype(np.int32)), col)
    return pa.table(columns), truncated


def _split_columns(table: pa.Table, column: str, scalar_columns: ScalarColumns) -> tuple[Any, list[str], list[str]]:
    """The token column, the other list columns (packed per token) and the scalar columns kept per sequence."""
    import pyarrow as pa

    names = table.column_names
    if column not in names:
        raise ValueError(f"column {column!r} not found; available columns: {names}")
    token_cols, scalars = [], []
    for name in names:
        if name == column:
            continue
        if name in _WRITTEN or (name == "input_ids" and column != "input_ids"):
            raise ValueError(
                f"column {name!r} is one the packer writes (are these rows packed already?); rename or remove it"
            )
        kind = table.schema.field(name).type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            token_cols.append(name)
        else:
            scalars.append(name)
    if scalars and scalar_columns == "error":
        raise ValueError(
            f"columns {scalars} are not lists, so they cannot be packed per token; remove them, "
            'or pass scalar_columns="drop" or "keep" (one value per sequence)'
        )
    if scalars and scalar_columns == "drop":
        # warnings (not logging) show a message once per process, not once per map batch
        warnings.warn(
            f"packing drops the non-list columns {scalars} (pass scalar_columns=\"keep\" to keep one value per "
            'sequence, or schema="full", whose example_ids join back to the source)',
            UserWarning,
            stacklevel=3,
        )
        scalars = []
    return table.column(column), token_cols, scalars


def _plan_pools(
    lengths: np.ndarray, capacity: int, pool_size: int | None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Plan each pool of ``pool_size`` consecutive examples on its own; rows of later pools come after.

    Returns:
        order: (N,) int64, example indices in packed order (row by row).
        row_counts: (R,) int64, examples in each row.
    """
    n = len(lengths)
    pool = n if pool_size is None else pool_size
    orders, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in range(0, n, max(pool, 1)):
        p = plan(lengths[s : s + pool], capacity, **kwargs)
        orders.append(p.order + s)
        counts.append(p.row_counts)
    return np.concatenate(orders), np.concatenate(counts)


def _narrow(values: np.ndarray) -> np.dtype:
    """int32 for 64-bit (or uint32) token ids that all fit in it, as TRL and datasets store ``input_ids``; else their dtype."""
    if values.dtype.kind in "iu" and values.dtype.itemsize >= 4 and values.dtype != np.int32 and len(values):
        info = np.iinfo(np.int32)
        if info.min <= values.min() and values.max() <= info.max:
            return np.dtype(np.int32)
    return values.dtype


def _gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dtype) -> np.ndarray:
    """(sum(lengths),) of ``dtype``: values[s : s + n] for each (s, n), concatenated, a slice of examples at a time."""
    ends = np.cumsum(lengths)
    out = _empty(int(ends[-1]) if len(ends) else 0, dtype)
    cuts = np.searchsorted(ends, np.arange(_GATHER_CHUNK, len(out), _GATHER_CHUNK))
    bounds = np.unique(np.concatenate([[0], cuts, [len(ends)]]))
    for a, b in itertools.pairwise(bounds.tolist()):
        index = layout.ranges(starts[a:b], lengths[a:b])
        dest = out[ends[a] - lengths[a] : ends[b - 1]]
        if out.dtype == values.dtype:
            # mode="clip" lets numpy write straight into `out` (the indices are in range by construction)
            np.take(values, index, out=dest, mode="clip")
        else:
            dest[:] = values[index]
    return out


def _empty(n: int, dtype) -> np.ndarray:
    """An uninitialised (n,) array; a large one is a fresh anonymous mapping with ordinary 4 KiB pages.

    numpy asks for transparent huge pages on arrays of 4 MiB and more; a one-shot packing job
    writes its output once, into memory the process never touched, and on VMs faulting that in
    as huge pages cost 4x the kernel time of ordinary pages (0.40 s against 0.10 s for 180 MiB on
    the development VM). Arrow wraps the array without a copy and keeps the mapping alive.
    """
    dtype = np.dtype(dtype)
    if n * dtype.itemsize < _MMAP_BYTES:
        return np.empty(n, dtype)
    return np.frombuffer(mmap.mmap(-1, n * dtype.itemsize), dtype)


def _scatter(real: np.ndarray, stream: np.ndarray, fill, name: str) -> np.ndarray:
    """Lay a padding-free stream into (R, C) rows filled from the left; the rest is ``fill``. Returns (R * C,)."""
    if stream.dtype.kind not in "biuf":
        raise ValueError(f"column {name!r} holds {stream.dtype} values, which pad_id padding cannot fill; remove it")
    grid = np.full(real.shape, fill, stream.dtype)
    grid[real] = stream
    return grid.reshape(-1)


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """An Arrow list array without copying ``values``; large_list once offsets pass int32."""
    import pyarrow as pa

    big = len(offsets) and offsets[-1] > np.iinfo(np.int32).max
    cls = pa.LargeListArray if big else pa.ListArray
    return cls.from_arrays(pa.array(offsets.astype(np.int64 if big else np.int32)), pa.array(values))


def _flat_lists(col, example_ids: np.ndarray, what: str, *, allow_empty: bool = False, numeric: bool = True):
    """N lists -> lengths (N,) int64 and the flat values (sum(lengths),) as numpy, with errors naming the example."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = col.type
    if numeric and (
        not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type)
    ):
        raise ValueError(f"{what} must hold lists of integer token ids, got {kind} (tokenize the text first)")
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"example {example_ids[i]} has no list in {what} (None)")
    lengths = pc.list_value_length(col).to_numpy().astype(np.int64)
    empty = np.flatnonzero(lengths == 0)
    if len(empty) and not allow_empty:
        i = int(empty[0])
        raise ValueError(
            f"example {example_ids[i]} has an empty list in {what} ({len(empty)} empty example(s)); "
            "every example needs at least one token: filter them out first"
        )
    values = pc.list_flatten(col)
    if values.null_count:
        at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        i = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
        raise ValueError(f"example {example_ids[i]} has a missing (None) value in {what}")
    # one chunk (the usual case) converts without a copy
    values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return lengths, values.to_numpy(zero_copy_only=False)


def _check_options(schema: str, scalar_columns: str, overflow: str, pool_size) -> None:
    check_overflow(overflow)
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if scalar_columns not in SCALAR_COLUMNS:
        raise ValueError(f"scalar_columns must be one of {SCALAR_COLUMNS}, got {scalar_columns!r}")
    if pool_size is not None and (isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1):
        raise ValueError(f"pool_size must be an integer >= 1 or None, got {pool_size!r}")


def _pack_split(ds: datasets.Dataset, pool_size: int | None, num_proc, load_from_cache_file, options: dict):
    """One ``Dataset`` -> its packed rows: one plan per pool (the whole dataset without a pool).

    A dataset with cache files goes through ``map(pack_examples)``, which writes the packed rows
    next to them and loads them on the next call with the same data and arguments. An in-memory
    dataset has nothing for ``map`` to cache (``datasets`` caches only datasets backed by files),
    so it is packed directly: ``map`` would copy every packed token once more through its writer.
    Both give the same rows.
    """
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    if ds.num_rows == 0:
        raise ValueError("the dataset is empty: nothing to pack")
    if options["column"] not in ds.column_names:
        raise ValueError(f"column {options['column']!r} not found; available columns: {ds.column_names}")
    if ds.cache_files or num_proc:
        packed = ds.with_format("arrow").map(
            pack_examples, batched=True, batch_size=pool_size, with_indices=True, remove_columns=ds.column_names,
            fn_kwargs=options, num_proc=num_proc, load_from_cache_file=load_from_cache_file, desc="Packing",
        )
    else:
        opts = {k: v for k, v in options.items() if k not in ("capacity", "column")}
        table = pack_table(ds.with_format("arrow")[:], options["capacity"], options["column"], pool_size=pool_size, **opts)
        # A random fingerprint: the default one would hash every packed token.
        packed = datasets.Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())
    return packed.with_format(ds.format["type"])


def _in_memory_dataset(data, column: str) -> datasets.Dataset:
    """A dict of columns or a list of token lists as an in-memory ``Dataset``, Arrow buffers not copied."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    # A random fingerprint: the default one would hash every token (and Python data has no cache files to hit).
    return datasets.Dataset(InMemoryTable(_arrow_table(data, column)), fingerprint=generate_random_fingerprint())


def _arrow_table(data, column: str, *, first_id: int = 0) -> pa.Table:
    """A Dataset / pyarrow Table / dict of columns / list of token lists as a pyarrow Table (no copy for Arrow sources)."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes, Mapping)):
        data = {column: data}  # a bare list of token lists
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # a datasets.Dataset
        return data.with_format("arrow")[:]  # honours select()/shuffle() indices
    if column not in data:
        raise ValueError(f"column {column!r} not found; available columns: {list(data)}")
    return pa.table({name: _column_array(name, values, first_id) for name, values in data.items()})


def _column_array(name: str, values, first_id: int):
    """One column of Python (or numpy) values as Arrow, naming the first example whose values' type differs."""
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        _raise_mixed(name, values, first_id)
        raise ValueError(f"column {name!r} cannot be converted to Arrow: {e}") from e
    kind = arr.type
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_floating(kind.value_type):
        _raise_mixed(name, values, first_id)  # Arrow quietly reads ints mixed with floats as floats
    return arr


def _raise_mixed(name: str, values, first_id: int) -> None:
    """Raise naming the first example whose values differ in type from the first value seen (or in list-ness)."""
    ref = None  # ((is a list, value type), example) of the first value seen
    for i, row in enumerate(values):
        if row is None:
            continue
        items = row.tolist() if hasattr(row, "tolist") else row
        is_list = isinstance(items, (list, tuple))
        for x in items if is_list else [items]:
            kind = (is_list, type(x))
            if ref is None:
                ref = (kind, i)
            elif kind != ref[0]:
                raise ValueError(
                    f"column {name!r} mixes types: example {first_id + i} holds {_describe(kind)}, but example "
                    f"{first_id + ref[1]} holds {_describe(ref[0])}; a column must hold one type"
                )


def _describe(kind: tuple[bool, type]) -> str:
    is_list, t = kind
    return f"lists of {t.__name__}" if is_list else f"a {t.__name__}"


def _pool_columns(pool: list, column: str, first_id: int) -> dict[str, list]:
    """A pool of streamed examples (dicts with the same keys, or bare token lists) as a dict of columns."""
    if not isinstance(pool[0], Mapping):
        return {column: [ex.tolist() if hasattr(ex, "tolist") else ex for ex in pool]}
    keys = list(pool[0])
    for i, ex in enumerate(pool):
        if not isinstance(ex, Mapping) or list(ex) != keys:
            got = list(ex) if isinstance(ex, Mapping) else type(ex).__name__
            if column not in (ex if isinstance(ex, Mapping) else ()):
                raise ValueError(f"example {first_id + i} has no column {column!r}; available columns: {got}")
            raise ValueError(f"example {first_id + i} has columns {got} but example {first_id} has {keys}")
    return {k: [ex[k].tolist() if hasattr(ex[k], "tolist") else ex[k] for ex in pool] for k in keys}
