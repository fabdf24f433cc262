"""Step 1 of the data flow: lengths -> plan.

A plan says, for every request, which row of a packed batch it lands in and at
which offset. It is pure numpy: nothing here imports torch, so the planner can
run inside any data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from . import layout

Algorithm = Literal["bfd", "ffd", "binpacking", "sorted", "none"]
ALGORITHMS: tuple[str, ...] = ("bfd", "ffd", "binpacking", "sorted", "none")

_NO_LIMIT = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Plan:
    """Where each request goes in a packed batch of ``num_rows`` rows of ``capacity`` tokens.

    Attributes:
        lengths: (N,) int64, tokens per request, in request order.
        row: (N,) int64, the row each request is placed in.
        offset: (N,) int64, the position in its row where the request starts.
        capacity: tokens per row.
        num_rows: rows used.
        algorithm: the algorithm that made the plan.

    Requests in a row never overlap and never cross ``capacity``.
    """

    lengths: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    capacity: int
    num_rows: int
    algorithm: str = "bfd"
    _order: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def order(self) -> np.ndarray:
        """(N,) int64: request indices in packed order, i.e. sorted by (row, offset)."""
        if self._order is None:
            object.__setattr__(self, "_order", np.lexsort((self.offset, self.row)))
        return self._order

    @property
    def row_lengths(self) -> np.ndarray:
        """(num_rows,) int64: tokens used in each row."""
        return np.bincount(self.row, weights=self.lengths, minlength=self.num_rows).astype(np.int64)

    @property
    def row_counts(self) -> np.ndarray:
        """(num_rows,) int64: requests in each row."""
        return np.bincount(self.row, minlength=self.num_rows).astype(np.int64)

    @property
    def efficiency(self) -> float:
        """Real tokens / (num_rows * capacity): 1.0 means no padding at all."""
        return self.num_tokens / max(1, self.num_rows * self.capacity)

    @property
    def lower_bound_l1(self) -> int:
        """ceil(sum(lengths) / capacity): no plan can use fewer rows."""
        return lower_bound_l1(self.lengths, self.capacity)

    @property
    def lower_bound_l2(self) -> int:
        """The Martello-Toth L2 bound, never below L1 and usually tighter."""
        return lower_bound_l2(self.lengths, self.capacity)


def plan(
    lengths: Sequence[int] | np.ndarray,
    capacity: int | None = None,
    *,
    algorithm: Algorithm = "bfd",
    max_per_row: int | None = None,
) -> Plan:
    """Assign every request to a row and an offset so that no row exceeds ``capacity``.

    Args:
        lengths: (N,) ints >= 1, tokens per request.
        capacity: tokens per row. ``None`` means the longest length, as in the
            prepacking paper.
        algorithm: ``"bfd"`` best-fit decreasing (default), ``"ffd"`` first-fit
            decreasing, ``"binpacking"`` the PyPI ``binpacking`` package (the
            prepacking paper's choice, quadratic), ``"sorted"`` one request per
            row ordered by length, ``"none"`` one request per row in request
            order (plain padding).
        max_per_row: at most this many requests in one row.

    Returns:
        A deterministic :class:`Plan`: the same input always gives the same plan.
    """
    lengths = _check_lengths(lengths)
    if capacity is None:
        capacity = int(lengths.max()) if len(lengths) else 1
    capacity = check_capacity(capacity)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if max_per_row is not None and (not _is_int(max_per_row) or max_per_row < 1):
        raise ValueError(f"max_per_row must be an integer >= 1, got {max_per_row!r}")
    layout.check_fits(lengths, capacity, hint="raise capacity or truncate them first")
    limit = _NO_LIMIT if max_per_row is None else int(max_per_row)
    if algorithm == "bfd":
        row, offset = _best_fit_decreasing(lengths, capacity, limit)
    elif algorithm == "ffd":
        row, offset = _first_fit_decreasing(lengths, capacity, limit)
    elif algorithm == "binpacking":
        row, offset = _binpacking(lengths, capacity, limit)
    elif algorithm == "sorted":
        row = np.empty(len(lengths), np.int64)
        row[np.argsort(-lengths, kind="stable")] = np.arange(len(lengths))
        offset = np.zeros(len(lengths), np.int64)
    else:  # "none"
        row, offset = np.arange(len(lengths), dtype=np.int64), np.zeros(len(lengths), np.int64)
    num_rows = int(row.max()) + 1 if len(row) else 0
    return Plan(lengths, row, offset, capacity, num_rows, algorithm)


def lower_bound_l1(lengths: np.ndarray, capacity: int) -> int:
    """ceil(sum(lengths) / capacity)."""
    return int(-(-int(np.sum(lengths)) // capacity))


def lower_bound_l2(lengths: np.ndarray, capacity: int) -> int:
    """Martello & Toth's L2 lower bound for bin packing, vectorised over all thresholds.

    For a threshold a <= C/2, items above C - a each need a row of their own,
    items in (C/2, C - a] too, and items in [a, C/2] can only use what those
    rows leave free; the rest needs ceil(excess / C) more rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0
    C = int(capacity)
    count = np.bincount(lengths, minlength=C + 1)[: C + 1]
    volume = count * np.arange(C + 1)
    # suffix sums: items with size >= s
    n_ge = np.cumsum(count[::-1])[::-1]
    v_ge = np.cumsum(volume[::-1])[::-1]
    half = C // 2
    a = np.arange(0, half + 1)
    hi = C - a + 1  # J1: size >= C - a + 1
    n_j1 = np.where(hi <= C, n_ge[np.minimum(hi, C)], 0)
    mid = half + 1  # J2 starts above C/2
    n_big = n_ge[mid] if mid <= C else 0
    v_big = v_ge[mid] if mid <= C else 0
    n_j2 = n_big - n_j1
    v_j2 = v_big - np.where(hi <= C, v_ge[np.minimum(hi, C)], 0)
    v_j3 = v_ge[np.maximum(a, 1)] - v_big  # sizes in [a, C/2]
    free = n_j2 * C - v_j2
    extra = np.maximum(0, -(-(v_j3 - free) // C))
    bound = int((n_j1 + n_j2 + extra).max())
    return max(bound, lower_bound_l1(lengths, C))


def _best_fit_decreasing(lengths: np.ndarray, C: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing over a histogram of the rows' free space.

    Requests are count-sorted by length and placed one length group at a time.
    For k equal items of length x, best fit always picks the open row with the
    least free space r >= x, and after a placement that row (r - x) is still
    the best fit while r - x >= x. So every row in bucket r absorbs
    min(r // x, slots left) items before the next bucket is touched, and a
    whole bucket moves at once. The loop runs over (length group, bucket)
    pairs, never over open rows per item, and the rows it touches are bounded
    by the group size.
    """
    n = len(lengths)
    row = np.empty(n, np.int64)
    offset = np.empty(n, np.int64)
    if n == 0:
        return row, offset
    by_length = _count_sort(lengths, C)
    sizes, starts, counts = np.unique(lengths[by_length], return_index=True, return_counts=True)

    buckets: dict[int, list[np.ndarray]] = {}  # free space -> row ids
    nonempty = np.zeros(C + 1, dtype=bool)
    fill = np.zeros(0, np.int64)  # requests per row, only tracked when limited
    num_rows = 0

    def push(free: np.ndarray, rows: np.ndarray) -> None:
        for f in np.unique(free):
            sel = rows[free == f] if len(rows) > 1 else rows
            if limit != _NO_LIMIT:
                sel = sel[fill[sel] < limit]  # full rows leave the histogram
                if len(sel) == 0:
                    continue
            buckets.setdefault(int(f), []).append(sel)
            nonempty[f] = True

    for g in range(len(sizes) - 1, -1, -1):
        x, k = int(sizes[g]), int(counts[g])
        items = by_length[starts[g] : starts[g] + k]
        placed_rows: list[np.ndarray] = []
        placed_offsets: list[np.ndarray] = []
        for f in np.flatnonzero(nonempty[x:]) + x:
            if k == 0:
                break
            f = int(f)
            rows = np.concatenate(buckets.pop(f))
            nonempty[f] = False
            slots = np.minimum(f // x, limit - fill[rows]) if limit != _NO_LIMIT else np.full(len(rows), f // x)
            total = np.cumsum(slots)
            if total[-1] > k:  # the group runs out inside this bucket
                cut = int(np.searchsorted(total, k))
                slots = slots[: cut + 1].copy()
                slots[-1] -= int(total[cut] - k)
                rest, rows = rows[cut + 1 :], rows[: cut + 1]
                if len(rest):
                    push(np.full(len(rest), f), rest)
            r, o = _place(rows, slots, C - f, x)
            placed_rows.append(r)
            placed_offsets.append(o)
            k -= len(r)
            if limit != _NO_LIMIT:
                fill[rows] += slots
            push(f - slots * x, rows)
        if k:
            per_row = min(C // x, limit)
            new = -(-k // per_row)
            rows = np.arange(num_rows, num_rows + new, dtype=np.int64)
            num_rows += new
            slots = np.full(new, per_row, np.int64)
            slots[-1] = k - per_row * (new - 1)
            r, o = _place(rows, slots, np.zeros(new, np.int64), x)
            placed_rows.append(r)
            placed_offsets.append(o)
            if limit != _NO_LIMIT:
                fill = np.concatenate([fill, slots])
            push(C - slots * x, rows)
        row[items] = np.concatenate(placed_rows)
        offset[items] = np.concatenate(placed_offsets)
    return row, offset


def _count_sort(lengths: np.ndarray, C: int) -> np.ndarray:
    """Stable argsort; numpy radix-sorts 16-bit keys, which is several times faster on millions of items."""
    keys = lengths.astype(np.uint16) if C < 2**16 else lengths
    return np.argsort(keys, kind="stable")


def _place(rows: np.ndarray, slots: np.ndarray, used, x: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand 'row i takes slots[i] items of length x, starting at used[i]' into per-item (row, offset)."""
    r = np.repeat(rows, slots)
    return r, np.repeat(np.broadcast_to(used, rows.shape), slots) + layout.positions(slots) * x


def _first_fit_decreasing(lengths: np.ndarray, C: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing, one length group at a time.

    For equal items, the first row with room keeps absorbing until it is
    full, so each row in index order takes min(free // x, slots left) items.
    Each group costs O(rows) numpy work.
    """
    n = len(lengths)
    row = np.empty(n, np.int64)
    offset = np.empty(n, np.int64)
    by_length = _count_sort(lengths, C)
    sizes, starts, counts = np.unique(lengths[by_length], return_index=True, return_counts=True)
    free = np.zeros(0, np.int64)
    fill = np.zeros(0, np.int64)
    for g in range(len(sizes) - 1, -1, -1):
        x, k = int(sizes[g]), int(counts[g])
        items = by_length[starts[g] : starts[g] + k]
        slots = np.minimum(free // x, limit - fill)
        total = np.cumsum(slots)
        if len(total) and total[-1] >= k:
            cut = int(np.searchsorted(total, k))
            slots[cut] -= int(total[cut] - k)
            slots[cut + 1 :] = 0
        else:
            per_row = min(C // x, limit)
            left = k - (int(total[-1]) if len(total) else 0)
            new = -(-left // per_row)
            extra = np.full(new, per_row, np.int64)
            extra[-1] = left - per_row * (new - 1)
            free = np.concatenate([free, np.full(new, C, np.int64)])
            fill = np.concatenate([fill, np.zeros(new, np.int64)])
            slots = np.concatenate([slots, extra])
        rows = np.flatnonzero(slots)
        r, o = _place(rows, slots[rows], C - free[rows], x)
        row[items], offset[items] = r, o
        free -= slots * x
        fill += slots
    return row, offset


def _binpacking(lengths: np.ndarray, C: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The PyPI ``binpacking`` package (``to_constant_volume``), the prepacking paper's choice."""
    try:
        import binpacking
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("algorithm='binpacking' needs the binpacking package: pip install binpacking") from e
    if limit != _NO_LIMIT:
        raise ValueError("algorithm='binpacking' does not support max_per_row; use 'bfd' or 'ffd'")
    bins = binpacking.to_constant_volume({i: int(v) for i, v in enumerate(lengths)}, C)
    row = np.empty(len(lengths), np.int64)
    offset = np.empty(len(lengths), np.int64)
    for r, b in enumerate(bins):
        idx = np.array(sorted(b), dtype=np.int64)
        row[idx] = r
        offset[idx] = layout.starts(lengths[idx])
    return row, offset


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_capacity(capacity, name: str = "capacity") -> int:
    """``capacity`` as an int, or a ValueError naming ``name`` if it is not a positive integer."""
    if not _is_int(capacity) or capacity <= 0:
        raise ValueError(f"{name} must be a positive integer, got {capacity!r}")
    return int(capacity)


def _check_lengths(lengths) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            bad = int(np.flatnonzero(np.mod(arr, 1) != 0)[0])
            raise ValueError(f"request {bad} has a non-integer length {arr[bad]!r}")
    arr = arr.astype(np.int64)
    empty = np.flatnonzero(arr <= 0)
    if len(empty):
        i = int(empty[0])
        raise ValueError(f"request {i} is empty (length {arr[i]}); every request needs at least one token")
    return arr
