"""Step 2 of the data flow: plan -> packed batch.

:class:`PackedBatch` is the one description of a packed layout. Position ids,
segment ids, ``cu_seqlens``, dense masks and the indices that scatter tokens
back to their requests are all derived from its :class:`~prepack.planner.Plan`;
nothing recomputes the layout elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from ..planner import layout
from ..attention.masks import document_mask, flash_window
from ..planner.bins import ALGORITHMS, Algorithm, Plan, check_capacity, plan

Overflow = Literal["error", "truncate_left", "truncate_right"]
OVERFLOWS: tuple[str, ...] = ("error", "truncate_left", "truncate_right")


class Varlen(NamedTuple):
    """A packed stream with no padding, in flash-attn's varlen layout.

    Attributes:
        input_ids: (T,) int64, the requests' tokens back to back in packed order.
        position_ids: (T,) int64, restarting at 0 for each request.
        cu_seqlens: (n + 1,) int32, request boundaries in ``input_ids``.
        max_seqlen: the longest request.
        indices: (T,) int64, where each token sits in the flattened (R * C) grid,
            as returned by flash-attn's ``unpad_input``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor


class Segments(NamedTuple):
    """The requests of some rows of a :class:`PackedBatch`, in stream order.

    Attributes:
        order: (n,) int64, the request of each segment (the plan's order).
        lengths: (n,) int64, its tokens.
        grid_start: (n,) int64, its first token in the rows' flattened (B * C) grid.
        stream_start: (n,) int64, its first token in the rows' varlen stream (no padding).
    """

    order: np.ndarray
    lengths: np.ndarray
    grid_start: np.ndarray
    stream_start: np.ndarray


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Requests packed into ``R`` rows of ``C`` tokens.

    Attributes:
        plan: the :class:`~prepack.planner.Plan` every other field derives from.
        input_ids: (R, C) int64, padding filled with ``pad_id``.
        position_ids: (R, C) int64, restarting at 0 for each request, 0 on padding.
        segment_ids: (R, C) int64, the request index of each token, -1 on padding.
        cu_seqlens: (N + 1,) int32, request boundaries in packed order
            (the order of :meth:`to_varlen`), as ``flash_attn_varlen_func`` expects.
        max_seqlen: the longest request.
        truncated: (N,) int64, tokens cut from each request by ``overflow``.
    """

    plan: Plan
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    truncated: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.plan.num_rows

    @property
    def capacity(self) -> int:
        return self.plan.capacity

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64, tokens per request in request order."""
        return self.plan.lengths

    @property
    def row(self) -> np.ndarray:
        """(N,) int64, each request's row."""
        return self.plan.row

    @property
    def offset(self) -> np.ndarray:
        """(N,) int64, each request's first position in its row."""
        return self.plan.offset

    @property
    def row_ptr(self) -> np.ndarray:
        """(R + 1,) int64: requests of row r are ``plan.order[row_ptr[r]:row_ptr[r+1]]``."""
        return np.concatenate([[0], np.cumsum(self.plan.row_counts)])

    @property
    def stream_starts(self) -> np.ndarray:
        """(N,) int64, where each request begins in the flat stream of :meth:`to_varlen` (request order)."""
        seg = self.segments()
        out = np.empty(self.plan.num_requests, np.int64)
        out[seg.order] = seg.stream_start
        return out

    def segments(self, rows: slice | None = None) -> Segments:
        """The requests of ``rows`` (default: all), in stream order, and where each starts: the one
        place a micro-batch's layout is derived from its plan."""
        start, stop, _ = (rows or slice(None)).indices(self.num_rows)
        order = self.plan.order[self.row_ptr[start] : self.row_ptr[stop]]
        lengths = self.plan.lengths[order]
        grid_start = (self.plan.row[order] - start) * self.capacity + self.plan.offset[order]
        return Segments(order, lengths, grid_start, layout.starts(lengths))

    def to_varlen(self, rows: slice | None = None) -> Varlen:
        """Drop the padding: the packed tokens as one flat stream plus ``cu_seqlens``.

        Args:
            rows: only these rows (a micro-batch), with ``cu_seqlens`` relative to them.
        """
        start, stop, _ = (rows or slice(None)).indices(self.num_rows)
        seg = self.segments(slice(start, stop))
        lengths = seg.lengths
        indices = torch.from_numpy(layout.ranges(seg.grid_start, lengths))
        grid = slice(start, stop)
        return Varlen(
            self.input_ids[grid].reshape(-1)[indices],
            self.position_ids[grid].reshape(-1)[indices],
            torch.from_numpy(layout.cu_seqlens(lengths)),
            int(lengths.max()) if len(lengths) else 0,
            indices,
        )

    def attention_mask(
        self,
        kind: Literal["bool", "additive"] = "bool",
        dtype: torch.dtype = torch.float32,
        *,
        window: int | None = None,
        chunk: int | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """The dense block-diagonal causal mask, (R, 1, C, C). Built on demand; O(R * C^2) memory.

        A query attends to a key iff both belong to the same request, the key is
        not after the query, and (with ``window``) fewer than ``window`` positions
        before it (:func:`prepack.attention.masks.document_mask`, the mask every backend
        means). Padding queries attend only to themselves, so no row of the mask
        is empty and a model's own SDPA never produces NaN from it.

        Args:
            kind: ``"bool"`` (True = attend) or ``"additive"`` (0 or the dtype's minimum).
            dtype: dtype of the additive mask.
            window: sliding window size, as in transformers' ``sliding_window``.
            chunk: chunked local attention (Llama 4's ``attention_chunk_size``): a query sees only
                keys of its own request whose position is in the same multiple of ``chunk``.
            rows: only these rows.
        """
        if kind not in ("bool", "additive"):
            raise ValueError(f"kind must be 'bool' or 'additive', got {kind!r}")
        seg = self.segment_ids[rows or slice(None)]
        if chunk is not None:
            # a chunk of a request is a segment of its own; positions restart per request, so chunks
            # start where transformers' chunked mask starts them for the request alone
            pos = self.position_ids[rows or slice(None)]
            seg = torch.where(seg >= 0, seg * (self.capacity // chunk + 1) + pos // chunk, seg)
        idx = torch.arange(seg.shape[-1]).expand_as(seg)
        window_size = flash_window((-1 if window is None else window - 1, 0), True, None)
        allowed = document_mask(seg, idx, seg, idx, window_size)
        allowed |= torch.eye(seg.shape[-1], dtype=torch.bool)  # padding sees itself
        allowed = allowed[:, None]
        if kind == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    def unpack(self, x: torch.Tensor | np.ndarray, *, flat: bool | None = None) -> list:
        """Split a packed tensor back into per-request pieces, in request order.

        Args:
            x: (R, C, ...) aligned with ``input_ids``, or (T, ...) aligned with
                :meth:`to_varlen` (packed order).
            flat: force the layout; by default (R, C, ...) is assumed when the
                leading dims match.

        Returns:
            N tensors (or arrays), the i-th of shape (lengths[i], ...).
        """
        p = self.plan
        if flat is None:
            flat = tuple(x.shape[:2]) != (self.num_rows, self.capacity)
        if flat:
            if x.shape[0] != p.num_tokens:
                raise ValueError(
                    f"cannot unpack a tensor of shape {tuple(x.shape)}: expected (R={self.num_rows}, "
                    f"C={self.capacity}, ...) or (T={p.num_tokens}, ...)"
                )
            return [x[s : s + n] for s, n in zip(self.stream_starts.tolist(), p.lengths.tolist())]
        return [x[r, o : o + n] for r, o, n in zip(p.row.tolist(), p.offset.tolist(), p.lengths.tolist())]


def pack(
    sequences: Sequence,
    capacity: int | None = None,
    *,
    pad_id: int = 0,
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    max_per_row: int | None = None,
) -> PackedBatch:
    """Pack token sequences into rows of ``capacity`` tokens.

    Args:
        sequences: N requests, each a list of ints or a 1-D integer tensor/array.
        capacity: tokens per row; ``None`` means the longest request.
        pad_id: token written into padding.
        algorithm: see :func:`prepack.plan`.
        overflow: what to do with a request longer than ``capacity``:
            ``"error"`` (default) raises, ``"truncate_left"`` keeps its last
            ``capacity`` tokens, ``"truncate_right"`` its first.
        max_per_row: at most this many requests per row.

    Returns:
        A :class:`PackedBatch`.
    """
    check_overflow(overflow)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if capacity is not None:
        capacity = check_capacity(capacity)
    tokens = [token_array(s, i) for i, s in enumerate(sequences)]
    lengths = layout.lengths_of(tokens)
    truncated = np.zeros(len(tokens), np.int64)
    if capacity is not None and len(tokens) and lengths.max() > capacity:
        if overflow == "error":
            layout.check_fits(lengths, capacity, hint='pass overflow="truncate_left" or "truncate_right", or raise capacity')
        for i in np.flatnonzero(lengths > capacity):
            tokens[i] = tokens[i][-capacity:] if overflow == "truncate_left" else tokens[i][:capacity]
        truncated = np.maximum(lengths - capacity, 0)
        lengths = np.minimum(lengths, capacity)
    return pack_plan(plan(lengths, capacity, algorithm=algorithm, max_per_row=max_per_row), tokens, pad_id=pad_id, truncated=truncated)


def pack_plan(p: Plan, tokens: Sequence[np.ndarray], *, pad_id: int = 0, truncated: np.ndarray | None = None) -> PackedBatch:
    """Lay out ``tokens`` (already checked, one int64 array per request) as ``p`` says."""
    R, C, n = p.num_rows, p.capacity, p.num_requests
    flat = np.concatenate(tokens) if n else np.zeros(0, np.int64)
    dest = layout.ranges(p.row * C + p.offset, p.lengths)
    positions = layout.positions(p.lengths)
    input_ids = np.full(R * C, pad_id, np.int64)
    input_ids[dest] = flat
    position_ids = np.zeros(R * C, np.int64)
    position_ids[dest] = positions
    segment_ids = np.full(R * C, -1, np.int64)
    segment_ids[dest] = np.repeat(np.arange(n, dtype=np.int64), p.lengths)
    return PackedBatch(
        plan=p,
        input_ids=torch.from_numpy(input_ids).view(R, C),
        position_ids=torch.from_numpy(position_ids).view(R, C),
        segment_ids=torch.from_numpy(segment_ids).view(R, C),
        cu_seqlens=torch.from_numpy(layout.cu_seqlens(p.lengths[p.order])),
        max_seqlen=int(p.lengths.max()) if n else 0,
        truncated=np.zeros(n, np.int64) if truncated is None else truncated,
    )


def check_overflow(overflow) -> None:
    """Reject an unknown ``overflow`` up front, whether or not anything would overflow."""
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {', '.join(map(repr, OVERFLOWS))}, got {overflow!r}")


def token_array(seq, i: int) -> np.ndarray:
    """One request -> 1-D int64 numpy array, with errors that name the request."""
    if isinstance(seq, torch.Tensor):
        if seq.dtype.is_floating_point or seq.dtype == torch.bool or seq.dtype.is_complex:
            raise ValueError(f"request {i} has dtype {seq.dtype}; token ids must be integers")
        arr = seq.detach().cpu().numpy()
    else:
        arr = np.asarray(seq)
        if arr.dtype == object:
            raise ValueError(f"request {i} is not a flat sequence of token ids")
    if arr.ndim != 1:
        raise ValueError(f"request {i} has shape {tuple(arr.shape)}; each request must be 1-D (pass a list of 1-D sequences)")
    if len(arr) == 0:
        raise ValueError(f"request {i} is empty; every request needs at least one token")
    if not (np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"request {i} has dtype {arr.dtype}; token ids must be integers")
    if arr.min() < 0:
        raise ValueError(f"request {i} has a negative token id {arr.min()}")
    return arr.astype(np.int64, copy=False)
