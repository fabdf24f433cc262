"""Step 1 of the data flow: lengths -> plan.

A plan says, for every request, which row of a packed batch it lands in and at
which offset. It is pure numpy: nothing here imports torch, so the planner can
run inside any data pipeline.
"""

from __future__ import annotations

from bisect import bisect_left, insort
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
    """Best-fit decreasing over a histogram of the rows' free space, one length group at a time.

    For k equal items of length x, best fit always picks the open row with the
    least free space r >= x, and after a placement that row (r - x) is still
    the best fit while r - x >= x. So every row of bucket r absorbs
    min(r // x, slots left) items before the next bucket is touched, and a
    whole bucket moves at once. Rows with equal free space (and, under
    ``max_per_row``, equal fill) are interchangeable for every later choice,
    so the row count is that of item-by-item best fit.

    Why plain Python for the bookkeeping: a bucket's rows are kept as ranges of
    row ids and each placement is one *segment* (rows a..a+m-1 each take s items
    of length x from offset o), so the loop costs a few Python operations per
    (length group, bucket) pair and no numpy call; numpy's ~1 us per call was
    what made spread-out lengths slow. Items longer than C/2 never share a row
    and take one vectorised step; all per-item output is built once at the end.
    """
    n = len(lengths)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = _sort_decreasing(lengths, C)
    ordered = lengths[order]
    first = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    ends = np.empty(len(first), np.int64)
    ends[:-1] = first[1:]
    ends[-1] = n
    big = int(np.count_nonzero(ordered[first] * 2 > C))  # the first groups, items longer than C/2
    sizes, counts, ends = ordered[first].tolist(), (ends - first).tolist(), ends.tolist()

    limited = limit != _NO_LIMIT
    W = limit + 1 if limited else 1  # bucket key = free * W + fill: least free first, then least full
    smallest = sizes[-1]  # rows with less free space than this can take nothing more
    buckets: dict[int, list[int]] = {}  # key -> row ids as flat ranges [a0, b0, a1, b1, ...), a < b
    rows_in: dict[int, int] = {}  # key -> rows in the bucket
    keys: list[int] = []  # sorted keys of non-empty buckets

    def push(ranges: list[int], free: int, fill: int, m: int) -> None:
        if free < smallest or (limited and fill >= limit):
            return  # the row is closed for good
        key = free * W + fill if limited else free
        if key in buckets:
            buckets[key] += ranges
            rows_in[key] += m
        else:
            buckets[key] = ranges
            rows_in[key] = m
            insort(keys, key)

    # Every item longer than C/2 opens a row. Sorted longest first, a group's rows are one contiguous
    # range and the groups' free spaces C - x come out distinct and ascending: the buckets are built directly.
    num_rows = sum(counts[:big])
    segments: list[int] = [0, num_rows, 1, 0] if num_rows else []  # flat (a, b, s, o) per segment
    if big and (not limited or limit > 1):
        for x, k, b in zip(sizes[:big], counts[:big], ends):
            if C - x >= smallest:
                key = (C - x) * W + 1 if limited else C - x
                keys.append(key)
                buckets[key] = [b - k, b]
                rows_in[key] = k

    fill = 0  # stays 0 without max_per_row
    for x, k in zip(sizes[big:], counts[big:]):
        while k:
            i = bisect_left(keys, x * W)
            if i == len(keys):
                break
            key = keys[i]
            if limited:
                f, fill = divmod(key, W)
                s = min(f // x, limit - fill)
            else:
                f = key
                s = f // x
            m = rows_in[key]
            if m * s <= k:  # the whole bucket moves down
                del keys[i], rows_in[key]
                ranges = buckets.pop(key)
                for j in range(0, len(ranges), 2):
                    segments += (ranges[j], ranges[j + 1], s, C - f)
                k -= m * s
                if f - s * x >= smallest:
                    push(ranges, f - s * x, fill + s, m)
                continue
            # the group ends inside this bucket: q rows take s items, then one row takes r
            q, r = divmod(k, s)
            ranges = buckets[key]
            j = 0
            while ranges[j + 1] - ranges[j] <= q:
                q -= ranges[j + 1] - ranges[j]
                j += 2
            taken = ranges[:j]
            if q:
                taken += (ranges[j], ranges[j] + q)
                ranges[j] += q
            del ranges[:j]
            for j in range(0, len(taken), 2):
                segments += (taken[j], taken[j + 1], s, C - f)
            moved = k // s
            if r:
                a = ranges[0]
                segments += (a, a + 1, r, C - f)
                if ranges[1] == a + 1:
                    del ranges[:2]
                else:
                    ranges[0] = a + 1
            left = m - moved - (1 if r else 0)
            if left:
                rows_in[key] = left
            else:
                del keys[i], buckets[key], rows_in[key]
            push(taken, f - s * x, fill + s, moved)
            if r:
                push([a, a + 1], f - r * x, fill + r, 1)
            k = 0
        if k:  # no open row has room: open rows of per_row items each
            per_row = min(C // x, limit)
            full, r = divmod(k, per_row)
            if full:
                segments += (num_rows, num_rows + full, per_row, 0)
                push([num_rows, num_rows + full], C - per_row * x, per_row, full)
                num_rows += full
            if r:
                segments += (num_rows, num_rows + 1, r, 0)
                push([num_rows, num_rows + 1], C - r * x, r, 1)
                num_rows += 1

    # Segment (a, b, s, o): rows a..b-1 each take s items (of one length) from offset o, in packed order.
    # Per item, only repeats and one prefix sum: an item's offset is its entry's start plus the
    # tokens packed before it in the same (segment, row) entry.
    seg = np.array(segments, np.int64).reshape(-1, 4)
    first_row, end_row, slots, start = seg.T
    num = end_row - first_row
    taken = np.repeat(slots, num)  # (E,) items per (segment, row) entry
    before = np.cumsum(ordered) - ordered  # (N,) tokens before each item in packed order
    row = np.empty(n, np.int64)
    offset = np.empty(n, np.int64)
    row[order] = np.repeat(layout.ranges(first_row, num), taken)
    offset[order] = before + np.repeat(np.repeat(start, num) - before[layout.starts(taken)], taken)
    return row, offset


def _sort_decreasing(lengths: np.ndarray, C: int) -> np.ndarray:
    """(N,) int64: request indices, longest first, ties in request order (numpy radix-sorts 16-bit keys)."""
    keys = (C - lengths).astype(np.uint16) if C < 2**16 else C - lengths
    return np.argsort(keys, kind="stable")


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
