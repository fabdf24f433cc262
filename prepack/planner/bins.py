"""Step 1 of the data flow: lengths -> plan.

A plan says, for every request, which row of a packed batch it lands in and at
which offset. It is pure numpy: nothing here imports torch, so the planner can
run inside any data pipeline.
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass, field
from itertools import repeat
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
    """Best-fit decreasing, one length group at a time, with the open rows on a stack.

    Items come longest first, so a row's free space only ever needs comparing with the current length
    x. Rows with free space >= x sit on a *stack* whose top has the least free space; the other rows are
    *parked* by free space. Best fit takes the top. When x drops, parked rows that now fit join the stack
    (largest free first, so the least free ends on top), and they fit nothing on the stack: every stack row
    had room for a longer item. A row that takes an item either still fits x, and then has the least
    free space of all, so it stays on top, or it parks. Hence the top is always the best fit.

    For k equal items of length x, the top row of free space f takes s = f // x of them in a row, so a
    stack entry holding m rows of equal free space (and, under ``max_per_row``, equal fill) takes m * s
    items in O(1): rows with equal free space are interchangeable for every later choice, so the row
    count is that of item-by-item best fit. Rows are ranges of row ids, each placement is one segment
    (rows a..b-1 each take s items from offset o), and the loop is plain Python (a few operations per
    (length group, stack entry) pair; numpy's ~1 us per call would dominate). Items longer than C/2
    never share a row and pair-able items in (C/3, C/2] are placed in numpy (:func:`_pairs`); per-item
    output is built once at the end.
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
    W = limit + 1 if limited else 1  # key = free * W + fill: least free first, then least full
    smallest = sizes[-1]  # rows with less free space than this can take nothing more
    stack: list[tuple] = []  # entries (key, m, a, b, more): m rows a..b-1 plus flat ranges in more (or None)
    parked: dict[int, tuple] = {}  # key -> entry, for rows with less free space than the current length
    keys: list[int] = []  # sorted keys of parked

    def park(key: int, m: int, a: int, b: int, more: list[int] | None) -> None:
        old = parked.get(key)
        if old is None:
            parked[key] = (key, m, a, b, more)
            insort(keys, key)
        else:
            parked[key] = (key, old[1] + m, a, b, [old[2], old[3]] + (old[4] or []) + (more or []))

    # Every item longer than C/2 opens a row: one contiguous range per group, free spaces C - x distinct.
    num_rows = sum(counts[:big])
    head = 1 if num_rows else 0  # out's segments before the pairs
    out = [0, num_rows, 1, 0] if num_rows else []  # flat (a, b, s, o) segments, in packed order
    if big and limit > 1:
        for x, k, b in zip(sizes[:big], counts[:big], ends):
            if C - x >= smallest:
                keys.append((C - x) * W + 1 if limited else C - x)
                parked[keys[-1]] = (keys[-1], k, b - k, b, None)
    g, paired = big, None
    while g < len(sizes) and 3 * sizes[g] > C and (not keys or sizes[g] > keys[-1] // W):
        g += 1
    lo = ends[big] - counts[big] if g > big else 0
    if g > big and ends[g - 1] - lo >= 32 and limit > 1:
        pairs = (ends[g - 1] - lo) // 2
        paired, more_parked = _pairs(ordered[lo : lo + 2 * pairs], num_rows, C, W, limit, smallest)
        for key in more_parked.keys() & parked.keys():
            _, m, a, b, more = more_parked[key]
            old = parked[key]
            more_parked[key] = (key, m + old[1], a, b, (more or []) + [old[2], old[3]] + (old[4] or []))
        parked.update(more_parked)
        keys = sorted(parked)
        num_rows += pairs
        if (ends[g - 1] - lo) % 2:  # the odd one out opens a row, in the loop below
            g -= 1
            counts[g] = 1
        big = g  # the loop starts here

    pop, push, waiting = stack.pop, stack.append, parked.get
    fill = 0  # stays 0 without max_per_row
    for x, k in zip(sizes[big:], counts[big:]):
        xW = x * W
        while keys and keys[-1] >= xW:  # parked rows that fit x now
            push(parked.pop(keys.pop()))
        while stack:
            key, m, a, b, more = pop()
            if limited:
                f, fill = divmod(key, W)
                s = f // x
                if s > limit - fill:
                    s = limit - fill
            else:
                f = key
                s = f // x
            if m * s > k:
                if m == 1:  # the usual end of a group when rows are long: one row takes all k, stays on top
                    out += (a, b, k, C - f)
                    push(((f - k * x) * W + fill + k if limited else f - k * x, 1, a, b, None))
                    k = 0
                break
            k -= m * s  # the whole entry takes s items per row and parks
            out += (a, b, s, C - f)
            if more:
                for j in range(0, len(more), 2):
                    out += (more[j], more[j + 1], s, C - f)
            f -= s * x
            if f >= smallest and (not limited or fill + s < limit):
                key = f * W + fill + s if limited else f
                if waiting(key) is None:
                    parked[key] = (key, m, a, b, more)
                    insort(keys, key)
                else:
                    park(key, m, a, b, more)
            if not k:
                break
        else:
            if k:  # no open row has room: open rows of per_row items each
                per_row = min(C // x, limit)
                full, r = divmod(k, per_row)
                if full:
                    out += (num_rows, num_rows + full, per_row, 0)
                    f = C - per_row * x
                    if f >= smallest and (not limited or per_row < limit):
                        park(f * W + per_row if limited else f, full, num_rows, num_rows + full, None)
                    num_rows += full
                if r:  # still has room for x: the new top
                    out += (num_rows, num_rows + 1, r, 0)
                    push(((C - r * x) * W + r if limited else C - r * x, 1, num_rows, num_rows + 1, None))
                    num_rows += 1
            continue
        if not k:
            continue
        # the group ends inside this entry: q rows take s items and park, then one row takes r and stays on top
        q, r = divmod(k, s)
        if more:
            ranges = [a, b] + more
            j, p = 0, q
            while ranges[j + 1] - ranges[j] <= p:
                p -= ranges[j + 1] - ranges[j]
                j += 2
            taken = ranges[:j]
            a, b, more = ranges[j], ranges[j + 1], ranges[j + 2 :]
            if p:
                taken += (a, a + p)
                a += p
            for j in range(0, len(taken), 2):
                out += (taken[j], taken[j + 1], s, C - f)
            if q and f - s * x >= smallest and (not limited or fill + s < limit):
                park((f - s * x) * W + fill + s if limited else f - s * x, q, taken[0], taken[1], taken[2:])
        else:
            if q:
                out += (a, a + q, s, C - f)
                if f - s * x >= smallest and (not limited or fill + s < limit):
                    park((f - s * x) * W + fill + s if limited else f - s * x, q, a, a + q, None)
            a += q
        one = a
        if r:
            a += 1
        if m - q - (1 if r else 0):  # the entry's other rows stay, under the one that took r
            push((key, m - q - (1 if r else 0), a, b, more) if a < b else (key, m - q - 1, more[0], more[1], more[2:]))
        if r:
            out += (one, one + 1, r, C - f)
            push(((f - r * x) * W + fill + r if limited else f - r * x, 1, one, one + 1, None))

    # Segment (a, b, s, o): rows a..b-1 each take s items (of one length) from offset o, in packed order.
    # Per item, only repeats and one prefix sum: an item's offset is its entry's start plus the
    # tokens packed before it in the same (segment, row) entry.
    seg = np.fromiter(out, np.int64, len(out)).reshape(-1, 4)
    if paired is not None:  # the pairs come right after the items longer than C/2
        seg = np.concatenate([seg[:head], paired, seg[head:]])
    first_row, end_row, slots, start = seg.T
    num = end_row - first_row
    taken = np.repeat(slots, num)  # (E,) items per (segment, row) entry
    before = np.cumsum(ordered) - ordered  # (N,) tokens before each item in packed order
    row = np.empty(n, np.int64)
    offset = np.empty(n, np.int64)
    row[order] = np.repeat(layout.ranges(first_row, num), taken)
    offset[order] = before + np.repeat(np.repeat(start, num) - before[layout.starts(taken)], taken)
    return row, offset


def _pairs(y: np.ndarray, first_row: int, C: int, W: int, limit: int, smallest: int) -> tuple[np.ndarray, dict]:
    """Best fit for an even run of items in (C/3, C/2] that no open row can take: consecutive pairs.

    The first item of a pair opens a row (nothing has room), the second fills it (nothing else has
    room: the row has >= C/2 free), and the leftover, under C/3, fits no item of the run.

    Args:
        y: (2P,) int64 lengths, longest first.
        first_row: the row id the first pair gets.

    Returns:
        (2P, 4) int64 segments (row, row + 1, 1, offset) in packed order, and the parked entries
        {key: (key, m, a, b, more)} of the rows that can still take an item of length ``smallest``.
    """
    rows = first_row + np.arange(len(y)) // 2
    offset = np.zeros(len(y), np.int64)
    offset[1::2] = y[0::2]
    seg = np.stack([rows, rows + 1, np.ones_like(rows), offset], 1)
    left = C - y[0::2] - y[1::2]  # (P,)
    keep = np.flatnonzero(left >= smallest) if limit > 2 else np.zeros(0, np.int64)
    by = keep[np.argsort(left[keep], kind="stable")]
    values, starts, many = np.unique(left[by], return_index=True, return_counts=True)
    keys = values * W + 2 if W > 1 else values
    one = many == 1  # most leftovers are distinct: build those entries without a Python loop
    r = (first_row + by[starts[one]]).tolist()
    k = keys[one].tolist()
    parked = dict(zip(k, zip(k, repeat(1), r, [i + 1 for i in r], repeat(None))))
    flat = np.stack([first_row + by, first_row + by + 1], 1).ravel().tolist()
    for key, i, m in zip(keys[~one].tolist(), starts[~one].tolist(), many[~one].tolist()):
        parked[key] = (key, m, flat[2 * i], flat[2 * i + 1], flat[2 * i + 2 : 2 * (i + m)])
    return seg, parked


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
