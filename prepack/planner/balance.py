"""Packed rows -> (optimizer step, rank, micro-step): equal batch counts, balanced cost. numpy only.

A data-parallel step waits for its slowest rank, and with gradient accumulation a rank's step is
its M micro-steps. :func:`balance_rows` deals R packed rows to ``steps`` optimizer steps, and within
each step to W ranks and then to M micro-steps, so that every rank gets the same number of
micro-batches (``steps * M``, none empty), every row is used exactly once, and the cost of each
rank's step (and of each micro-step) is even::

    rows (R,) cost  --sort by cost, deal in a snake over steps-->  steps
                    --per step: snake over ranks, then over micro-steps-->  slot (step, rank, micro)

A snake (0, 1, ..., W-1, W-1, ..., 0, 0, 1, ...) over rows sorted by cost gives each slot one row of
every cost band, so slots differ by at most the spread within a band. Ties and the step order come
from ``numpy.random.default_rng(seed + epoch)``: the same on every rank, with no communication.

Cost of a row of sequences of lengths L_i: ``sum(L_i)`` (tokens), or with ``attention=a``
``sum(a * L_i + L_i**2)``: a layer's projections and MLP cost about ``24 h^2`` FLOPs per token and
causal attention about ``2 h L`` per token of a length-L sequence, so per sequence
``24 h^2 L + 2 h L^2 = 2h (12 h L + L^2)``: ``a = 12 * hidden_size`` (see :func:`attention_coefficient`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def attention_coefficient(hidden_size: int) -> float:
    """``a`` of the cost ``a * L + L**2`` for a decoder of this hidden size: 12 * hidden_size (see the module doc)."""
    return 12.0 * hidden_size


def row_costs(seq_lengths: np.ndarray, row_counts: np.ndarray, attention: float | None = None) -> np.ndarray:
    """Each row's cost: (R,) float64.

    Args:
        seq_lengths: (S,) int, every row's sequence lengths back to back.
        row_counts: (R,) int, sequences in each row.
        attention: None: cost = tokens; a: cost = sum over the row's sequences of ``a * L + L**2``.
    """
    lengths = np.asarray(seq_lengths, np.float64)
    per_seq = lengths if attention is None else attention * lengths + lengths * lengths
    rows = np.repeat(np.arange(len(row_counts)), np.asarray(row_counts, np.int64))
    return np.bincount(rows, weights=per_seq, minlength=len(row_counts))


@dataclass(frozen=True)
class Schedule:
    """Where every row goes: R rows, ``steps`` optimizer steps of W ranks x M micro-steps.

    Attributes:
        step, rank, micro: (R,) int64, each row's slot; every (step, rank, micro) holds at least one row.
        steps: optimizer steps in the epoch.
    """

    step: np.ndarray
    rank: np.ndarray
    micro: np.ndarray
    steps: int

    def micro_batches(self, rank: int) -> list[np.ndarray]:
        """Rank ``rank``'s ``steps * M`` micro-batches in order: each the row indices of one slot."""
        mine = np.flatnonzero(self.rank == rank)
        M = int(self.micro.max()) + 1 if len(self.micro) else 0
        key = self.step[mine] * M + self.micro[mine]
        order = mine[np.argsort(key, kind="stable")]
        bounds = np.searchsorted(key[np.argsort(key, kind="stable")], np.arange(1, self.steps * M))
        return np.split(order, bounds)


def _deal(sizes: np.ndarray) -> np.ndarray:
    """(sum(sizes),) bin labels, bin b appearing sizes[b] times, spread evenly along the sequence and in a snake
    where bins are equal (0, 1, ..., k-1, k-1, ..., 0, ...): dealt to items sorted by cost, every bin gets
    its share of every cost band."""
    sizes = np.asarray(sizes, np.int64)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    j = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # index within its bin
    pos = (j + 0.5) / sizes[labels]
    tie = np.where(j % 2 == 0, labels, -labels)
    return labels[np.lexsort((tie, pos))]


def _labels(group_sizes: np.ndarray, k: int) -> np.ndarray:
    """For consecutive groups of these sizes, each group's items dealt over k bins (``_deal(_even(n, k))``)."""
    cache: dict[int, np.ndarray] = {}
    parts = []
    for n in group_sizes.tolist():
        if n not in cache:
            cache[n] = _deal(_even(n, k))
        parts.append(cache[n])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _even(n: int, k: int) -> np.ndarray:
    """(k,) n items split into k counts that differ by at most one."""
    return np.full(k, n // k, np.int64) + (np.arange(k) < n % k)


def balance_rows(
    costs: np.ndarray, world_size: int, micro_steps: int = 1, rows_per_micro_batch: int = 1, *, seed: int = 0, epoch: int = 0
) -> Schedule:
    """Deal R rows over optimizer steps, ranks and micro-steps (module doc).

    Args:
        costs: (R,) float, each row's cost (:func:`row_costs`).
        world_size: W data-parallel ranks.
        micro_steps: M micro-steps (gradient accumulation) per optimizer step.
        rows_per_micro_batch: B, the rows a micro-batch holds. ``steps = ceil(R / (W * M * B))``, so a
            micro-batch holds B rows or fewer; when that would leave a micro-batch empty, the epoch
            has fewer steps (``R // (W * M)``) and a micro-batch holds up to ``ceil(R / (steps * W * M))``.
        seed, epoch: the shuffle; the same on every rank.

    Raises:
        ValueError: when the R rows cannot give each of the W * M micro-batches of a step one row.
    """
    costs = np.asarray(costs, np.float64)
    R, W, M, B = len(costs), world_size, micro_steps, rows_per_micro_batch
    for name, v in (("world_size", W), ("micro_steps", M), ("rows_per_micro_batch", B)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if R < W * M:
        raise ValueError(
            f"{R} packed rows cannot give each of {W} ranks x {M} micro-steps a micro-batch; "
            "pack more data, or lower the world size or gradient accumulation"
        )
    steps = -(-R // (W * M * B))
    if R < steps * W * M:
        steps = R // (W * M)
    rng = np.random.default_rng(seed + epoch)
    # Rows per step in whole rounds of W (one row per rank), so a step gives every rank as many rows;
    # the R % W rows left over go to one step.
    step_sizes = _even(R // W, steps) * W
    step_sizes[rng.integers(steps)] += R % W
    # random order first, then a stable sort: rows of equal cost are dealt in a fresh order each epoch
    shuffled = rng.permutation(R)
    by_cost = shuffled[np.argsort(-costs[shuffled], kind="stable")]
    step = np.empty(R, np.int64)
    step[by_cost] = rng.permutation(steps)[_deal(step_sizes)]
    # per step, its rows by cost (by_cost's order kept): dealt to ranks, then each rank's rows to its micro-steps.
    # Step sizes take at most three values, so each deal is computed once per size.
    in_step = by_cost[np.argsort(step[by_cost], kind="stable")]
    rank = np.empty(R, np.int64)
    rank[in_step] = _labels(np.bincount(step, minlength=steps), W)
    in_slot = in_step[np.argsort(step[in_step] * W + rank[in_step], kind="stable")]  # by (step, rank), cost order kept
    micro = np.empty(R, np.int64)
    micro[in_slot] = _labels(np.bincount(step * W + rank, minlength=steps * W), M)
    return Schedule(step=step, rank=rank, micro=micro, steps=steps)
