"""The data packer: a ``pyarrow.Table`` of N examples -> a table of packed rows (plan, then gather).

Every packing front (:func:`prepack.pack_dataset`, :func:`prepack.pack_examples`,
:func:`prepack.pack_iterable`, :func:`prepack.ray_data.pack_ray_dataset`) validates its
options once into a :class:`PackOptions` and hands it to :func:`pack_with_cuts`::

    table (N examples) --arrow.flat_lists--> lengths (N,), flat values per list column
          --planner.plan (per pool)--> order (N,), row_counts (R,)
          --_gather (one index, every column)--> packed streams --arrow.list_array--> R packed rows

The row schemas are documented in :mod:`prepack.data`. Offsets and boundaries come from
:mod:`prepack.planner.layout`, the one builder of the layout's quantities.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import arrow
from ..planner import layout
from ..planner import pieces
from .batch import OVERFLOWS
from ..planner.bins import ALGORITHMS, check_capacity, plan

if TYPE_CHECKING:
    import pyarrow as pa

# the data packer's logger keeps the name it had when the packer lived in prepack.data
logger = logging.getLogger("prepack.data")

Schema = Literal["lean", "full"]
# The packer's overflow: the planner's, plus TRL's bfd_split ("split": cut into capacity-long pieces, keep all).
Overflow = Literal["error", "truncate_left", "truncate_right", "split"]
DATA_OVERFLOWS: tuple[str, ...] = (*OVERFLOWS, "split")
# The planner's algorithms, plus TRL's "wrapped" (the stream cut every capacity tokens, boundaries kept).
Algorithm = Literal["bfd", "ffd", "binpacking", "sorted", "none", "wrapped"]
PACK_ALGORITHMS: tuple[str, ...] = (*ALGORITHMS, "wrapped")
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
# Output columns at least this large are allocated as a plain anonymous mapping; see _empty.
# numpy asks for huge pages from 4 MiB on, so every column it would ask them for is mapped instead.
_MMAP_BYTES = 1 << 22


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class PackOptions:
    """How to pack, validated once: what every packing front builds from its keywords and passes down.

    Attributes:
        capacity: tokens per row (a positive integer).
        column: the column of token-id lists (N lists, integer dtype); written as ``input_ids``.
        schema: ``"lean"`` (default) or ``"full"``: the columns listed in :mod:`prepack.data`.
        scalar_columns: what to do with columns that are not lists: ``"drop"`` (default, with a
            warning naming them), ``"keep"`` (one value per sequence, like ``seq_lengths``) or ``"error"``.
        algorithm: the planner's algorithm, see :func:`prepack.plan`; or ``"wrapped"``: the examples'
            concatenated stream cut every ``capacity`` tokens (TRL's ``strategy="wrapped"``), each row
            recording where one example ends and the next begins (``seq_lengths``), so a padding-free
            batch keeps them apart. ``"wrapped"`` cuts every example it must, so it takes no ``overflow``
            and no ``max_per_row``.
        overflow: an example longer than ``capacity``: ``"error"`` (default) raises,
            ``"truncate_left"`` keeps its last ``capacity`` tokens, ``"truncate_right"`` its first
            (TRL's ``strategy="bfd"``), ``"split"`` cuts it into pieces of ``capacity`` tokens and a
            shorter rest, each placed as an example of its own, keeping every token (TRL's
            ``"bfd_split"``; each piece's ``example_ids`` entry is its example). Cuts are logged, and
            the tokens dropped are recorded in the ``truncated`` column of the full schema.
        pad_id: ``None`` (default) gives padding-free rows of varying length; a token id (>= 0)
            pads every row to ``capacity`` with it (labels -100, position 0, other list columns 0).
        max_per_row: at most this many examples per row (None: no limit).

    Raises:
        ValueError: naming the first option that is not one of its allowed values.
    """

    capacity: int
    column: str = "input_ids"
    schema: Schema = "lean"
    scalar_columns: ScalarColumns = "drop"
    algorithm: Algorithm = "bfd"
    overflow: Overflow = "error"
    pad_id: int | None = None
    max_per_row: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacity", check_capacity(self.capacity))
        if not isinstance(self.column, str):
            raise ValueError(f"column must be a column name (a str), got {self.column!r}")
        if self.schema not in SCHEMAS:
            raise ValueError(f"schema must be one of {SCHEMAS}, got {self.schema!r}")
        if self.scalar_columns not in SCALAR_COLUMNS:
            raise ValueError(f"scalar_columns must be one of {SCALAR_COLUMNS}, got {self.scalar_columns!r}")
        if self.algorithm not in PACK_ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(PACK_ALGORITHMS)}")
        if self.overflow not in DATA_OVERFLOWS:
            raise ValueError(f"overflow must be one of {', '.join(map(repr, DATA_OVERFLOWS))}, got {self.overflow!r}")
        if self.algorithm == "wrapped" and self.overflow != "error":
            raise ValueError(
                f'algorithm="wrapped" cuts examples at row boundaries itself, so it takes no overflow (got '
                f"{self.overflow!r}); leave overflow at its default"
            )
        if self.algorithm == "wrapped" and self.max_per_row is not None:
            raise ValueError('algorithm="wrapped" fills every row to capacity, so it takes no max_per_row')
        if self.pad_id is not None and (not _is_int(self.pad_id) or self.pad_id < 0):
            raise ValueError(f"pad_id must be a token id (an integer >= 0) or None, got {self.pad_id!r}")
        if self.max_per_row is not None and (not _is_int(self.max_per_row) or self.max_per_row < 1):
            raise ValueError(f"max_per_row must be an integer >= 1 or None, got {self.max_per_row!r}")


def check_pool_size(pool_size) -> int | None:
    """``pool_size`` as an int (or None), or a ValueError: examples planned together must be >= 1."""
    if pool_size is not None and (not _is_int(pool_size) or pool_size < 1):
        raise ValueError(f"pool_size must be an integer >= 1 or None, got {pool_size!r}")
    return None if pool_size is None else int(pool_size)


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
            see :class:`PackOptions`.

    Returns:
        The packed rows, in plan order.
    """
    options = PackOptions(capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row)
    packed, cuts = pack_with_cuts(table, options, example_ids=example_ids, pool_size=check_pool_size(pool_size))
    log_cuts(cuts, options)
    return packed


def log_cuts(cuts: np.ndarray, options: PackOptions) -> None:
    """Log a warning when ``overflow`` cut tokens; cuts (N,) are the tokens cut from each of N examples."""
    log_truncation(int(np.count_nonzero(cuts)), len(cuts), int(cuts.sum()), options)


def log_truncation(examples_cut: int, examples: int, tokens_cut: int, options: PackOptions, who: str = "") -> None:
    """Log a warning when ``overflow`` cut tokens, so truncation is never silent."""
    if tokens_cut:
        logger.warning(
            f"{who}truncated {examples_cut} of {examples} examples ({tokens_cut} tokens) "
            f"to capacity {options.capacity} ({options.overflow})"
        )


def pack_with_cuts(
    table: pa.Table, options: PackOptions, *, example_ids: np.ndarray | None = None, pool_size: int | None = None
) -> tuple[pa.Table, np.ndarray]:
    """:func:`pack_table` with options validated already; also returns the (N,) tokens cut from each example.

    Args:
        table: N examples.
        options: how to pack.
        example_ids: (N,) the examples' names (default ``arange(N)``).
        pool_size: examples planned together (None: all N).

    Returns:
        The packed rows (R rows, plan order), and cuts (N,) int64, the tokens ``overflow`` cut from each example.
    """
    import pyarrow as pa

    ids = np.arange(table.num_rows, dtype=np.int64) if example_ids is None else np.asarray(example_ids, np.int64)
    if len(ids) != table.num_rows:
        raise ValueError(f"example_ids has {len(ids)} entries for {table.num_rows} examples")
    lengths, flat, scalar_cols = _read_columns(table, ids, options)
    lengths, flat, cuts = _truncate(lengths, flat, ids, options)
    # pieces (P,) in the examples' flat buffer, each with its example in `source` (P = N unless cut)
    order, row_counts, lengths, source = _plan_pools(lengths, options, pool_size)
    columns = _packed_columns(flat, lengths, order, row_counts, options)
    example = source[order]  # (P,) each placed piece's example
    if options.schema == "full":
        row_ptr = layout.starts(np.append(row_counts, 0))
        columns["example_ids"] = arrow.list_array(row_ptr, ids[example])
        columns["truncated"] = arrow.list_array(row_ptr, cuts[example].astype(np.int32))
    if scalar_cols:
        taken = pa.array(example)
        row_ptr = layout.starts(np.append(row_counts, 0))
        for name in scalar_cols:  # one value per sequence, in row order
            col = table.column(name).take(taken)
            columns[name] = arrow.list_array(row_ptr, col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    return pa.table(columns), cuts


def _read_columns(table: pa.Table, ids: np.ndarray, options: PackOptions):
    """The lengths (N,) int64, the flat values of every list column ({name: (sum(lengths),)}, the tokens as
    ``input_ids`` first) and the names of the scalar columns kept per sequence; errors name the example."""
    column = options.column
    token_cols, scalar_cols = _split_columns(table, column, options.scalar_columns)
    lengths, values = arrow.flat_lists(table.column(column), ids, f"column {column!r}")
    if values.dtype.kind == "i" and len(values) and values.min() < 0:
        at = int(np.flatnonzero(values < 0)[0])
        i = int(np.searchsorted(layout.starts(lengths) + lengths, at, side="right"))
        raise ValueError(
            f"example {ids[i]} has a negative token id {values[at]} in column {column!r}; token ids must be >= 0 "
            "(an ignored label such as -100 belongs in a labels column, which is packed alongside)"
        )
    # Every list column travels with the tokens: (name, flat values), same offsets as the tokens.
    flat = {"input_ids": values}
    for name in token_cols:
        col_lengths, flat[name] = arrow.flat_lists(
            table.column(name), ids, f"column {name!r}", allow_empty=True, numeric=False
        )
        bad = np.flatnonzero(col_lengths != lengths)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"example {ids[i]} has {lengths[i]} tokens but {col_lengths[i]} values in column {name!r}; "
                "a list column needs one value per token (remove the column first if it is not per token)"
            )
    return lengths, flat, scalar_cols


def _split_columns(table: pa.Table, column: str, scalar_columns: ScalarColumns) -> tuple[list[str], list[str]]:
    """The list columns other than ``column`` (packed per token) and the scalar columns kept per sequence."""
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
        (token_cols if arrow.is_list_type(table.schema.field(name).type) else scalars).append(name)
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
            stacklevel=4,
        )
        scalars = []
    return token_cols, scalars


def _truncate(lengths: np.ndarray, flat: dict[str, np.ndarray], ids: np.ndarray, options: PackOptions):
    """Apply ``overflow``: (lengths (N,), flat values, cuts (N,) int64, the tokens cut from each example)."""
    C = options.capacity
    cuts = np.maximum(lengths - C, 0)
    if not cuts.any() or options.overflow == "split" or options.algorithm == "wrapped":
        return lengths, flat, np.zeros_like(lengths)  # split and wrapped cut examples into pieces, keeping every token
    if options.overflow == "error":
        layout.check_fits(
            lengths, C, what="example", ids=ids,
            hint='pass overflow="truncate_left" or "truncate_right", or raise capacity',
        )
    over = np.flatnonzero(cuts)
    # Cut only the overflow: the index work is proportional to the tokens dropped, not to the dataset.
    cut_from = layout.starts(lengths)[over] + (0 if options.overflow == "truncate_left" else C)
    keep = np.ones(int(lengths.sum()), bool)
    keep[layout.ranges(cut_from, cuts[over])] = False
    return lengths - cuts, {name: v[keep] for name, v in flat.items()}, cuts


def _plan_pools(lengths: np.ndarray, options: PackOptions, pool_size: int | None):
    """Cut (``overflow="split"``, ``"wrapped"``) and plan each pool of ``pool_size`` consecutive examples on its
    own; rows of later pools come after.

    Args:
        lengths: (N,) int64, the examples' lengths (after truncation).

    Returns:
        order: (P,) int64, piece indices in packed order (row by row).
        row_counts: (R,) int64, pieces in each row.
        pieces: (P,) int64, the pieces' lengths, back to back in the examples' flat buffer (the examples
            themselves when nothing is cut).
        source: (P,) int64, each piece's example.
    """
    n, C = len(lengths), options.capacity
    pool = n if pool_size is None else pool_size
    parts: list[tuple] = [(np.zeros(0, np.int64),) * 4]
    done = 0  # pieces of earlier pools
    for s in range(0, n, max(pool, 1)):
        pool_lengths = lengths[s : s + pool]
        if options.algorithm == "wrapped":
            cut, source, row_counts = pieces.wrap(pool_lengths, C)
            order = np.arange(len(cut), dtype=np.int64)
        else:
            cut, source = (pieces.split(pool_lengths, C) if options.overflow == "split"
                           else (pool_lengths, np.arange(len(pool_lengths), dtype=np.int64)))
            p = plan(cut, C, algorithm=options.algorithm, max_per_row=options.max_per_row)
            order, row_counts = p.order, p.row_counts
        parts.append((order + done, row_counts, cut, source + s))
        done += len(cut)
    order, row_counts, cut, source = (np.concatenate(x).astype(np.int64) for x in zip(*parts))
    return order, row_counts, cut, source


def _packed_columns(flat, lengths, order, row_counts, options: PackOptions) -> dict[str, Any]:
    """The per-token columns and ``seq_lengths`` (and the full schema's ``position_ids``, ``cu_seqlens``) of R rows.

    A plan fills each row from offset 0 in (row, offset) order, so a row is simply its
    examples in plan order, back to back: S = N sequences, ``seq`` (S,) their lengths.
    """
    seq = lengths[order]
    row_ptr = layout.starts(np.append(row_counts, 0))  # (R + 1,) int64: each row's first sequence
    dtypes = {name: v.dtype for name, v in flat.items()}
    dtypes["input_ids"] = _narrow(flat["input_ids"], options.pad_id)
    if "labels" in flat:
        dtypes["labels"] = _narrow(flat["labels"])
    streams = _gather(flat, dtypes, layout.starts(lengths)[order], seq)
    if options.schema == "full":
        labels = streams.get("labels", streams["input_ids"])
        # a signed dtype, so -100 fits; a copy when labels are the tokens themselves
        labels = labels.astype(np.promote_types(labels.dtype, np.int8), copy="labels" not in streams)
        # Labels are unshifted (the model shifts them): -100 on a sequence's first
        # token stops the previous sequence's last token from learning to predict it.
        labels[layout.starts(seq)] = IGNORE_INDEX
        streams["labels"] = labels
        streams["position_ids"] = layout.positions(seq, np.int32)

    tokens_per_row = np.add.reduceat(seq, row_ptr[:-1]) if len(seq) else np.zeros(0, np.int64)
    if options.pad_id is None:
        row_offsets = layout.starts(np.append(tokens_per_row, 0))
    else:
        real = np.arange(options.capacity) < tokens_per_row[:, None]  # (R, C): rows are filled from the left
        fills = {"input_ids": options.pad_id, "labels": IGNORE_INDEX}
        streams = {name: _scatter(real, s, fills.get(name, 0), name) for name, s in streams.items()}
        row_offsets = np.arange(len(tokens_per_row) + 1, dtype=np.int64) * options.capacity

    columns = {name: arrow.list_array(row_offsets, s) for name, s in streams.items() if name != "position_ids"}
    if options.schema == "full":
        columns["position_ids"] = arrow.list_array(row_offsets, streams["position_ids"])
    columns["seq_lengths"] = arrow.list_array(row_ptr, seq.astype(np.int32))
    if options.schema == "full":
        columns["cu_seqlens"] = _row_cu_seqlens(seq, row_counts)
    return columns


def _row_cu_seqlens(seq: np.ndarray, row_counts: np.ndarray) -> pa.Array:
    """Each row's ``cu_seqlens`` (S_r + 1,) int32, as a list array: layout.cu_seqlens of its sequences' lengths.

    Row r's boundaries are the stream's boundaries from its first sequence to its last, less the first:
    no per-row Python loop, and the running sum stays int64 (a table may hold over 2**31 tokens).
    """
    bounds = layout.starts(np.append(seq, 0))  # (S + 1,) int64: the whole stream's boundaries
    first = layout.starts(row_counts)  # (R,) each row's first sequence
    index = layout.ranges(first, row_counts + 1)  # (S + R,) the S_r + 1 boundaries of each row
    cu = (bounds[index] - np.repeat(bounds[first], row_counts + 1)).astype(np.int32)
    return arrow.list_array(layout.starts(np.append(row_counts + 1, 0)), cu)


def _narrow(values: np.ndarray, pad_id: int | None = None) -> np.dtype:
    """int32 for 64-bit (or uint32) token ids that all fit in it (with ``pad_id``), as TRL and datasets store
    ``input_ids``; else their dtype."""
    if values.dtype.kind in "iu" and values.dtype.itemsize >= 4 and values.dtype != np.int32 and len(values):
        info = np.iinfo(np.int32)
        hi = max(int(values.max()), -1 if pad_id is None else pad_id)
        if info.min <= values.min() and hi <= info.max:
            return np.dtype(np.int32)
    return values.dtype


def _gather(flat: dict[str, np.ndarray], dtypes: dict[str, np.dtype], starts: np.ndarray, lengths: np.ndarray):
    """Every stream's values[s : s + n] for each (s, n), concatenated: {name: (sum(lengths),) of dtypes[name]}.

    A slice of examples at a time; the slice's gather index is built once and serves every
    column (building it costs about as much as one gather).
    """
    ends = layout.starts(lengths) + lengths
    total = int(ends[-1]) if len(ends) else 0
    out = {name: _empty(total, dtypes[name]) for name in flat}
    cuts = np.searchsorted(ends, np.arange(_GATHER_CHUNK, total, _GATHER_CHUNK))
    bounds = np.unique(np.concatenate([[0], cuts, [len(ends)]]))
    for a, b in itertools.pairwise(bounds.tolist()):
        index = layout.ranges(starts[a:b], lengths[a:b])
        lo, hi = ends[a] - lengths[a], ends[b - 1]
        for name, values in flat.items():
            dest = out[name][lo:hi]
            if dest.dtype == values.dtype:
                # mode="clip" lets numpy write straight into `dest` (the indices are in range by construction)
                np.take(values, index, out=dest, mode="clip")
            else:
                dest[:] = values[index]
    return out


def _empty(n: int, dtype) -> np.ndarray:
    """An uninitialised (n,) array; a large one is a fresh anonymous mapping with ordinary 4 KiB pages, populated.

    numpy asks for transparent huge pages on arrays of 4 MiB and more; a one-shot packing job
    writes its output once, into memory the process never touched, and on VMs faulting that in
    as huge pages cost 4x the kernel time of ordinary pages (0.40 s against 0.10 s for 180 MiB on
    the development VM). The output is written whole, so the mapping is populated when it is made
    (``MAP_POPULATE``, Linux): one pass in the kernel instead of a page fault per 4 KiB, half the
    kernel time (0.08 s against 0.15 s for 226 MiB there). Arrow wraps the array without a copy
    and keeps the mapping alive.
    """
    dtype = np.dtype(dtype)
    size = n * dtype.itemsize
    if size < _MMAP_BYTES:
        return np.empty(n, dtype)
    if hasattr(mmap, "MAP_POPULATE"):
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    else:  # other systems fault the pages in as they are written
        buf = mmap.mmap(-1, size)
    return np.frombuffer(buf, dtype)


def _scatter(real: np.ndarray, stream: np.ndarray, fill, name: str) -> np.ndarray:
    """Lay a padding-free stream into (R, C) rows filled from the left; the rest is ``fill``. Returns (R * C,)."""
    if stream.dtype.kind not in "biuf":
        raise ValueError(f"column {name!r} holds {stream.dtype} values, which pad_id padding cannot fill; remove it")
    grid = np.full(real.shape, fill, stream.dtype)
    grid[real] = stream
    return grid.reshape(-1)
