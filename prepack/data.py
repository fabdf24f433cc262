"""The data-pipeline path: a dataset of token lists -> a dataset of packed training rows.

Lengths come straight from the Arrow column (no Python object per example),
:func:`prepack.plan` places every example, and the output rows are built with
numpy index arithmetic over the flat token buffer. Three entry points share
one packer, :func:`_pack_arrow`:

* :func:`pack_dataset` plans over the whole dataset (or ``pool_size`` chunks);
* :func:`pack_examples` is a ``Dataset.map(batched=True)`` function that plans
  over each map batch (works with ``num_proc``);
* :func:`pack_iterable` streams: it packs a bounded pool of examples at a time.

Every packed row has the same columns (S = sequences in the row, L = tokens in
the row: their sum without padding, ``capacity`` with ``pad_id``)::

    input_ids     (L,)     the sequences back to back (token dtype of the source)
    labels        (L,)     input_ids (or the source's ``labels``), -100 on each
                           sequence's first token and on padding
    position_ids  (L,)     int32, restarting at 0 for each sequence, 0 on padding
    seq_lengths   (S,)     int32, tokens of each sequence, in row order
    cu_seqlens    (S + 1,) int32, ``[0, l0, l0 + l1, ...]``
    example_ids   (S,)     int64, each sequence's index in the source
    truncated     (S,)     int32, tokens ``overflow`` cut from each sequence

:func:`to_flash_kwargs` turns a list of such rows into the keyword arguments of
transformers' padding-free (``DataCollatorWithFlattening``) training step.

pyarrow (and ``datasets`` for :func:`pack_dataset`) are imported when called,
so ``import prepack`` works without them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import layout
from .hf import cu_seqlens_from_position_ids
from .packing import Overflow, check_overflow
from .planner import Algorithm, check_capacity, lower_bound_l2, plan

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what transformers' cross-entropy skips
PACKED_COLUMNS: tuple[str, ...] = (
    "input_ids", "labels", "position_ids", "seq_lengths", "cu_seqlens", "example_ids", "truncated",
)

# Gather tokens in slices of about this many, so the int64 index temporaries
# stay small instead of 8 bytes for every token of the dataset.
_GATHER_CHUNK = 1 << 24


@dataclass(frozen=True)
class PackStats:
    """What packing did, computed from the packed columns by :func:`pack_stats`.

    Attributes:
        num_examples: sequences in the packed data (every source example, once).
        num_rows: packed rows.
        num_tokens: real tokens kept (padding not counted).
        capacity: tokens per row.
        num_truncated_examples: examples that ``overflow`` shortened.
        num_truncated_tokens: tokens ``overflow`` cut off.
        lower_bound_l2: the Martello-Toth bound: no packing of these lengths
            into rows of ``capacity`` uses fewer rows.
    """

    num_examples: int
    num_rows: int
    num_tokens: int
    capacity: int
    num_truncated_examples: int
    num_truncated_tokens: int
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
    data: datasets.Dataset | Mapping[str, Sequence] | Sequence[Sequence[int]],
    capacity: int,
    column: str = "input_ids",
    *,
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pool_size: int | None = None,
    pad_id: int | None = None,
    max_per_row: int | None = None,
) -> datasets.Dataset:
    """Pack a whole dataset of token lists into rows of at most ``capacity`` tokens.

    Unlike a ``map(batched=True)`` packer, the plan sees the whole dataset (or
    ``pool_size`` consecutive examples at a time), so rows are as full as the
    lengths allow, not as full as one map batch allows.

    Args:
        data: a ``datasets.Dataset``, a dict of columns, or a list of token lists.
            A ``labels`` column, if present (e.g. prompt tokens masked with -100),
            is packed alongside ``column``; other columns are not carried
            (``example_ids`` joins back to them).
        capacity: tokens per row.
        column: the column of token-id lists (N lists, integer dtype).
        algorithm: see :func:`prepack.plan`.
        overflow: an example longer than ``capacity``: ``"error"`` (default)
            raises, ``"truncate_left"`` keeps its last ``capacity`` tokens,
            ``"truncate_right"`` its first. Cuts are recorded in ``truncated``
            and logged; see :func:`pack_stats`.
        pool_size: plan over chunks of this many consecutive examples instead of
            the whole dataset (shuffle first if the order is not random).
        pad_id: ``None`` (default) gives padding-free rows of varying length,
            as ``DataCollatorWithFlattening`` expects; an int pads every row to
            ``capacity`` with it (labels -100, position 0 on padding).
        max_per_row: at most this many examples per row.

    Returns:
        A ``datasets.Dataset`` (in memory) with the columns listed in
        :mod:`prepack.data`, rows in plan order (longest examples first with
        ``"bfd"``: shuffle before training).

    Raises:
        ValueError: naming the first bad example: missing (None) or empty
            token list, too long with ``overflow="error"``, mismatched labels;
            or naming the available columns when ``column`` is not one.
    """
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    capacity = check_capacity(capacity)
    tokens, labels = _source_columns(data, column)
    table = _pack_arrow(
        tokens, labels, np.arange(len(tokens), dtype=np.int64), capacity,
        algorithm=algorithm, overflow=overflow, pool_size=pool_size, pad_id=pad_id, max_per_row=max_per_row,
    )
    # A random fingerprint: the default one would hash every packed token.
    return datasets.Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())


def pack_examples(
    batch: Mapping[str, Sequence] | pa.Table,
    indices: Sequence[int] | None = None,
    *,
    capacity: int,
    column: str = "input_ids",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pad_id: int | None = None,
    max_per_row: int | None = None,
) -> dict[str, list] | pa.Table:
    """A ``Dataset.map(batched=True)`` function: one map batch of examples -> packed rows.

    The plan only sees the batch it is given, so rows fill less than with
    :func:`pack_dataset`; in exchange it runs under ``map``'s caching and
    ``num_proc``::

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
        capacity, column, algorithm, overflow, pad_id, max_per_row: as in :func:`pack_dataset`.

    Returns:
        The packed rows: a ``pyarrow.Table`` for a table batch, else a dict of lists.
    """
    import pyarrow as pa

    capacity = check_capacity(capacity)
    tokens, labels = _source_columns(batch, column)
    ids = np.arange(len(tokens), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    table = _pack_arrow(
        tokens, labels, ids, capacity,
        algorithm=algorithm, overflow=overflow, pool_size=None, pad_id=pad_id, max_per_row=max_per_row,
    )
    return table if isinstance(batch, pa.Table) else table.to_pydict()


def pack_iterable(
    examples: Iterable[Mapping[str, Any] | Sequence[int]],
    capacity: int,
    column: str = "input_ids",
    *,
    pool_size: int = 10_000,
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
        examples: dicts holding ``column`` (and optionally ``labels``), or bare token lists.
        pool_size: examples planned together; larger pools fill rows better.
        capacity, column, algorithm, overflow, pad_id, max_per_row: as in :func:`pack_dataset`.

    Yields:
        One dict per packed row, with the columns listed in :mod:`prepack.data`;
        ``example_ids`` count examples from 0 across the whole stream.
    """
    import pyarrow as pa

    capacity = check_capacity(capacity)
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"pool_size must be an integer >= 1, got {pool_size!r}")
    it = iter(examples)
    start = cut_examples = cut_tokens = 0
    while pool := list(itertools.islice(it, pool_size)):
        tokens = pa.chunked_array([pa.array([_example_tokens(ex, column, start + i) for i, ex in enumerate(pool)])])
        has_labels = isinstance(pool[0], Mapping) and "labels" in pool[0]
        labels = pa.chunked_array([pa.array([ex.get("labels") for ex in pool])]) if has_labels else None
        table = _pack_arrow(
            tokens, labels, np.arange(start, start + len(pool), dtype=np.int64), capacity,
            algorithm=algorithm, overflow=overflow, pool_size=None, pad_id=pad_id, max_per_row=max_per_row, log=False,
        )
        truncated = table.column("truncated").combine_chunks().flatten().to_numpy()
        cut_examples += int(np.count_nonzero(truncated))
        cut_tokens += int(truncated.sum())
        start += len(pool)
        yield from table.to_pylist()
    if cut_tokens:
        logger.warning(f"pack_iterable truncated {cut_examples} of {start} examples ({cut_tokens} tokens) to capacity {capacity}")


def pack_stats(packed: datasets.Dataset | Mapping[str, Sequence] | pa.Table, capacity: int) -> PackStats:
    """Summarise packed rows (from any of the packers) without Python objects per token.

    Args:
        packed: packed rows with ``seq_lengths`` and ``truncated`` columns.
        capacity: the capacity they were packed to.
    """
    import pyarrow.compute as pc

    table = _arrow_table(packed, ("seq_lengths", "truncated"))
    lengths = pc.list_flatten(table.column("seq_lengths")).to_numpy().astype(np.int64)
    truncated = pc.list_flatten(table.column("truncated")).to_numpy()
    return PackStats(
        num_examples=len(lengths),
        num_rows=table.num_rows,
        num_tokens=int(lengths.sum()),
        capacity=int(capacity),
        num_truncated_examples=int(np.count_nonzero(truncated)),
        num_truncated_tokens=int(truncated.sum()),
        lower_bound_l2=lower_bound_l2(lengths, capacity),
    )


def to_flash_kwargs(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor | int]:
    """Collate packed rows into one padding-free batch: the kwargs of transformers' varlen attention path.

    Usable as a ``DataLoader`` ``collate_fn`` or a ``Trainer`` ``data_collator``.
    Sequence boundaries come from the restarts of ``position_ids`` (as in
    transformers' own ``position_ids`` -> ``cu_seq_lens`` path), so only
    ``input_ids``, ``position_ids`` and ``labels`` are needed, the columns a
    ``Trainer`` keeps with ``remove_unused_columns=True``. Padding positions
    are 0, so each pad token is a one-token sequence and attends to itself only.

    Args:
        rows: B packed rows, the b-th with ``input_ids`` and ``position_ids`` of
            shape (L_b,) and optionally ``labels`` (L_b,).

    Returns:
        ``input_ids``, ``position_ids``, ``labels``: (1, T) int64 with T = sum(L_b);
        ``cu_seq_lens_q``, ``cu_seq_lens_k``: (n + 1,) int32;
        ``max_length_q``, ``max_length_k``: int, the longest sequence.
        Without ``labels`` in the rows, labels are ``input_ids`` with -100 on
        each sequence's first token, as ``DataCollatorWithFlattening`` makes them.
    """
    if not rows:
        raise ValueError("to_flash_kwargs got no rows")
    ids = np.concatenate([np.asarray(r["input_ids"], np.int64) for r in rows])
    pos = np.concatenate([np.asarray(r["position_ids"], np.int64) for r in rows])
    if ids.shape != pos.shape or not len(ids) or pos[0] != 0:
        raise ValueError(
            f"rows must be packed rows whose position_ids start at 0 and match input_ids; "
            f"got {len(ids)} input_ids and {len(pos)} position_ids starting at {pos[:1].tolist()}"
        )
    position_ids = torch.from_numpy(pos)[None]
    cu = cu_seqlens_from_position_ids(position_ids, 1, len(pos))
    if "labels" in rows[0]:
        labels = np.concatenate([np.asarray(r["labels"], np.int64) for r in rows])
    else:
        labels = ids.copy()
        labels[cu[:-1].numpy()] = IGNORE_INDEX
    longest = int(np.diff(cu.numpy()).max())
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": position_ids,
        "labels": torch.from_numpy(labels)[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


# --- the packer shared by every entry point --------------------------------------------------------


def _pack_arrow(
    tokens: pa.ChunkedArray,
    labels: pa.ChunkedArray | None,
    example_ids: np.ndarray,
    capacity: int,
    *,
    algorithm: Algorithm,
    overflow: Overflow,
    pool_size: int | None,
    pad_id: int | None,
    max_per_row: int | None,
    log: bool = True,
) -> pa.Table:
    """N token lists (and optional labels) -> a table of packed rows with :data:`PACKED_COLUMNS`.

    Args:
        tokens: N lists of integer token ids.
        labels: N lists of the same lengths, or None (labels = tokens).
        example_ids: (N,) int64, the examples' indices in the source, for errors and ``example_ids``.
    """
    import pyarrow as pa

    check_overflow(overflow)
    if pool_size is not None and (not isinstance(pool_size, int) or pool_size < 1):
        raise ValueError(f"pool_size must be an integer >= 1 or None, got {pool_size!r}")
    lengths, values = _flat_lists(tokens, example_ids, "token")
    if labels is not None:
        label_lengths, label_values = _flat_lists(labels, example_ids, "label", allow_empty=True)
        bad = np.flatnonzero(label_lengths != lengths)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"example {example_ids[i]} has {lengths[i]} tokens but {label_lengths[i]} labels; they must match"
            )
    C = capacity
    truncated = np.maximum(lengths - C, 0)
    if truncated.any():
        over = np.flatnonzero(truncated)
        if overflow == "error":
            layout.check_fits(
                lengths, C, what="example", ids=example_ids,
                hint='pass overflow="truncate_left" or "truncate_right", or raise capacity',
            )
        # Cut only the overflow: the index work is proportional to the tokens dropped, not to the dataset.
        cut_from = layout.starts(lengths)[over] + (0 if overflow == "truncate_left" else C)
        keep = np.ones(len(values), bool)
        keep[layout.ranges(cut_from, truncated[over])] = False
        values = values[keep]
        if labels is not None:
            label_values = label_values[keep]
        lengths = lengths - truncated
        if log:
            logger.warning(
                f"truncated {len(over)} of {len(lengths)} examples ({int(truncated.sum())} tokens) "
                f"to capacity {C} ({overflow}); see the 'truncated' column"
            )

    order, row_counts = _plan_pools(lengths, C, pool_size, algorithm=algorithm, max_per_row=max_per_row)
    # A plan fills each row from offset 0 in (row, offset) order, so a row is
    # simply its examples in plan order, back to back.
    seq = lengths[order]
    starts = layout.starts(lengths)[order]  # where each packed example begins in `values`
    row_ptr = np.concatenate([[0], np.cumsum(row_counts)])
    stream = _gather(values, starts, seq)
    label_stream = stream if labels is None else _gather(label_values, starts, seq)
    # a signed dtype, so -100 fits; a copy when labels are the tokens themselves
    label_stream = label_stream.astype(np.promote_types(label_stream.dtype, np.int8), copy=labels is None)
    positions = layout.positions(seq, np.int32)
    seq_first = layout.starts(seq)
    # Labels are unshifted (the model shifts them): -100 on a sequence's first
    # token stops the previous sequence's last token from learning to predict it.
    label_stream[seq_first] = IGNORE_INDEX

    tokens_per_row = np.add.reduceat(seq, row_ptr[:-1]) if len(seq) else np.zeros(0, np.int64)
    if pad_id is None:
        row_offsets = np.concatenate([[0], np.cumsum(tokens_per_row)])
    else:
        real = np.arange(C) < tokens_per_row[:, None]  # (R, C): rows are filled from the left
        stream, label_stream, positions = (
            _scatter(real, stream, pad_id), _scatter(real, label_stream, IGNORE_INDEX), _scatter(real, positions, 0)
        )
        row_offsets = np.arange(len(tokens_per_row) + 1, dtype=np.int64) * C

    # Each row's cu_seqlens is [0, running sum of its lengths]: one more entry than sequences.
    cu_ptr = row_ptr + np.arange(len(row_ptr))
    cu = np.zeros(len(seq) + len(row_counts), np.int32)
    is_head = np.zeros(len(cu), bool)
    is_head[cu_ptr[:-1]] = True
    cu[~is_head] = seq_first + seq - np.repeat(seq_first[row_ptr[:-1]], row_counts)
    columns = {
        "input_ids": _lists(row_offsets, stream),
        "labels": _lists(row_offsets, label_stream),
        "position_ids": _lists(row_offsets, positions),
        "seq_lengths": _lists(row_ptr, seq.astype(np.int32)),
        "cu_seqlens": _lists(cu_ptr, cu),
        "example_ids": _lists(row_ptr, example_ids[order]),
        "truncated": _lists(row_ptr, truncated[order].astype(np.int32)),
    }
    return pa.table(columns)


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


def _gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate values[s : s + n] for each (s, n), a slice of examples at a time."""
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if len(ends) else 0, values.dtype)
    bounds = np.unique(np.concatenate([[0], np.searchsorted(ends, np.arange(_GATHER_CHUNK, len(out), _GATHER_CHUNK)), [len(ends)]]))
    for a, b in itertools.pairwise(bounds.tolist()):
        # mode="clip" lets numpy write straight into `out` (the indices are in range by construction)
        np.take(values, layout.ranges(starts[a:b], lengths[a:b]), out=out[ends[a] - lengths[a] : ends[b - 1]], mode="clip")
    return out


def _scatter(real: np.ndarray, stream: np.ndarray, fill: int) -> np.ndarray:
    """Lay a padding-free stream into (R, C) rows filled from the left; the rest is ``fill``. Returns (R * C,)."""
    grid = np.full(real.shape, fill, stream.dtype)
    grid[real] = stream
    return grid.reshape(-1)


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """An Arrow list array without copying ``values``; large_list once offsets pass int32."""
    import pyarrow as pa

    big = len(offsets) and offsets[-1] > np.iinfo(np.int32).max
    cls = pa.LargeListArray if big else pa.ListArray
    return cls.from_arrays(pa.array(offsets.astype(np.int64 if big else np.int32)), pa.array(values))


def _flat_lists(col: pa.ChunkedArray, example_ids: np.ndarray, what: str, *, allow_empty: bool = False):
    """N lists of ints -> lengths (N,) int64 and the flat values (sum(lengths),), with errors naming the example."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = col.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
        raise ValueError(f"expected lists of integer {what} ids, got {kind} (tokenize the text first)")
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"example {example_ids[i]} has no {what} list (None)")
    lengths = pc.list_value_length(col).to_numpy().astype(np.int64)
    empty = np.flatnonzero(lengths == 0)
    if len(empty) and not allow_empty:
        i = int(empty[0])
        raise ValueError(
            f"example {example_ids[i]} has an empty {what} list ({len(empty)} empty example(s)); "
            "every example needs at least one token: filter them out first"
        )
    values = pc.list_flatten(col)
    if values.null_count:
        at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        i = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
        raise ValueError(f"example {example_ids[i]} has a missing (None) {what} id")
    # one chunk (the usual case) converts without a copy
    return lengths, values.chunk(0).to_numpy() if values.num_chunks == 1 else values.to_numpy()


def _source_columns(data, column: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray | None]:
    """The token column and the optional ``labels`` column of any supported source, as Arrow arrays."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes, Mapping)):
        data = {column: data}  # a bare list of token lists
    table = _arrow_table(data, (column, "labels"), required=(column,))
    labels = table.column("labels") if "labels" in table.column_names and column != "labels" else None
    return table.column(column), labels


def _arrow_table(data, columns: Sequence[str], required: Sequence[str] | None = None) -> pa.Table:
    """The named columns of a Dataset / pyarrow Table / dict of columns, as a pyarrow Table (no copy for Arrow sources).

    Columns not in ``required`` (default: all) are skipped when absent.
    """
    import pyarrow as pa

    names = list(data.column_names) if hasattr(data, "column_names") else list(data.keys())
    for name in columns if required is None else required:
        if name not in names:
            raise ValueError(f"column {name!r} not found; available columns: {names}")
    present = [c for c in dict.fromkeys(columns) if c in names]
    if isinstance(data, pa.Table):
        return data.select(present)
    if hasattr(data, "with_format") and hasattr(data, "select_columns"):  # a datasets.Dataset
        return data.select_columns(present).with_format("arrow")[:]  # honours select()/shuffle() indices
    return pa.table({c: pa.array(data[c]) if not isinstance(data[c], pa.ChunkedArray) else data[c] for c in present})


def _example_tokens(example, column: str, index: int):
    """The token list of one streamed example (a dict or a bare list)."""
    if isinstance(example, Mapping):
        if column not in example:
            raise ValueError(f"example {index} has no column {column!r}; available columns: {list(example)}")
        example = example[column]
    return example.tolist() if hasattr(example, "tolist") else example
