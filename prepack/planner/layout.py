"""The packing layout's quantities, one builder each (numpy only, like the planner).

Every module that lays tokens out (``planner``, ``packing``, ``data``, ``kvcache``,
``prefill``) derives offsets, positions, ``cu_seqlens`` and gather/scatter
indices from a list of segment lengths through these functions, so a layout
means the same thing everywhere::

    lengths = [3, 1, 2]
    starts(lengths)      -> [0, 3, 4]            where each segment begins in the stream
    cu_seqlens(lengths)  -> [0, 3, 4, 6]  int32  flash-attn's varlen boundaries
    positions(lengths)   -> [0, 1, 2, 0, 0, 1]   position ids, restarting per segment
    ranges([10, 20, 30], lengths) -> [10, 11, 12, 20, 30, 31]   token indices of each segment

Dense masks are attention semantics and live in :mod:`prepack.attention.masks`
(:func:`~prepack.attention.masks.document_mask`); this module never imports torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def lengths_of(sequences) -> np.ndarray:
    """(N,) int64: ``len`` of each of N sequences (token arrays, lists, tensors)."""
    return np.fromiter((len(s) for s in sequences), np.int64, len(sequences))


def starts(lengths) -> np.ndarray:
    """(N,) int64: where each of N back-to-back segments begins (an exclusive cumulative sum)."""
    lengths = np.asarray(lengths, np.int64)
    return np.cumsum(lengths) - lengths


def cu_seqlens(lengths) -> np.ndarray:
    """(N + 1,) int32: ``[0, l0, l0 + l1, ...]``, the segment boundaries ``flash_attn_varlen_func`` takes."""
    out = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def positions(lengths, dtype=np.int64) -> np.ndarray:
    """(sum(lengths),): 0, 1, ..., n - 1 for each segment of n tokens, back to back.

    A running sum of ones that steps back to 0 at each segment start: one pass, no index temporaries.
    """
    lengths = np.asarray(lengths, np.int64)
    steps = np.ones(int(lengths.sum()), dtype)
    nonempty = lengths > 0
    if nonempty.any():
        first = starts(lengths)[nonempty]
        back = np.zeros(len(first), np.int64)
        # at a segment start, undo the previous non-empty segment's count
        back[1:] = 1 - lengths[nonempty][:-1]
        steps[first] = back
    return np.cumsum(steps, dtype=dtype, out=steps)


def chunked(lengths, chunk: int) -> np.ndarray:
    """Each segment cut into pieces of ``chunk`` tokens (the last piece may be shorter), back to back.

    Chunked local attention (Llama 4's ``attention_chunk_size``) in a stream whose positions
    restart per segment: a chunk of a segment is a segment of its own::

        chunked([5, 2], 2) -> [2, 2, 1, 2]
    """
    lengths = np.asarray(lengths, np.int64)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    pieces = -(-lengths // chunk)  # ceil
    out = np.full(int(pieces.sum()), chunk, np.int64)
    last = np.cumsum(pieces)[pieces > 0] - 1
    out[last] = lengths[pieces > 0] - (pieces[pieces > 0] - 1) * chunk
    return out


def ranges(first, lengths) -> np.ndarray:
    """(sum(lengths),) int64: ``arange(s, s + n)`` for each (s, n), concatenated, without a Python loop.

    The gather/scatter index of a layout: token p of segment i sits at ``first[i] + p``.
    Built like :func:`positions`, a running sum of ones that jumps at each segment start, so the
    only array allocated is the result (a gather over millions of tokens touches no other fresh memory).
    """
    lengths = np.asarray(lengths, np.int64)
    steps = np.ones(int(lengths.sum()), np.int64)
    nonempty = lengths > 0
    if nonempty.any():
        first = np.asarray(first, np.int64)[nonempty]
        n = lengths[nonempty]
        jump = np.empty(len(first), np.int64)
        jump[0] = first[0]
        # from the previous segment's last index to this segment's first
        jump[1:] = first[1:] - (first[:-1] + n[:-1] - 1)
        steps[starts(n)] = jump
    return np.cumsum(steps, out=steps)


def check_fits(lengths, limit: int, *, what: str = "request", limit_name: str = "capacity", ids=None, hint: str = "") -> None:
    """Raise a ValueError naming the first segment longer than ``limit``.

    Args:
        lengths: (N,) ints.
        what: what a segment is called in the message ("request", "example").
        limit_name: what the limit is called ("capacity", "token_budget").
        ids: (N,) the names of the segments (default: their index).
        hint: appended in parentheses, e.g. how to fix it.
    """
    lengths = np.asarray(lengths)
    over = np.flatnonzero(lengths > limit)
    if len(over):
        i = int(over[0])
        name = i if ids is None else ids[i]
        notes = ([f"{len(over)} {what}s too long"] if len(over) > 1 else []) + ([hint] if hint else [])
        fix = f" ({'; '.join(notes)})" if notes else ""
        raise ValueError(f"{what} {name} has {int(lengths[i])} tokens but {limit_name} is {limit}{fix}")


@dataclass(frozen=True, eq=False)
class Parts:
    """Where N requests' tokens sit in the chunks of earlier forwards: one or more pieces per request.

    A request run whole is one piece; a request that continued a shared prefix, or was prefilled in
    chunks, is several (the prefix's, then each chunk's), in token order. Every layout that gathers a
    request's keys and values (per-request caches, the keys a later segment continues) is built from
    this one description.

    Attributes:
        owner: (P,) int64, the request of each piece, nondecreasing; a request's pieces in token order.
        chunk: (P,) int64, the forward (index into a list of chunks) that holds the piece.
        starts: (P,) int64, where the piece's first token sits in that chunk's flattened (B * L) token axis.
        sizes: (P,) int64, tokens in the piece (>= 1).
        num_requests: N.
    """

    owner: np.ndarray
    chunk: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    num_requests: int

    @classmethod
    def whole(cls, chunk, starts, lengths) -> "Parts":
        """One piece per request (none for an empty one): request i is ``lengths[i]`` tokens at ``starts[i]`` of ``chunk[i]``."""
        lengths = np.asarray(lengths, np.int64)
        keep = np.flatnonzero(lengths)
        return cls(keep, np.asarray(chunk, np.int64)[keep], np.asarray(starts, np.int64)[keep], lengths[keep], len(lengths))

    @classmethod
    def join(cls, pieces: "list[tuple[int, int, int, int]]", num_requests: int) -> "Parts":
        """From ``(owner, chunk, start, size)`` tuples listed in token order per request (requests may interleave)."""
        rows = sorted((p for p in pieces if p[3] > 0), key=lambda p: p[0])  # stable: token order kept per request
        cols = np.array(rows, np.int64).reshape(-1, 4).T
        return cls(cols[0], cols[1], cols[2], cols[3], num_requests)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """(N,) int64, tokens per request."""
        return np.bincount(self.owner, self.sizes, minlength=self.num_requests).astype(np.int64)

    @functools.cached_property
    def _first(self) -> np.ndarray:
        """(N + 1,) int64, each request's first piece (pieces are grouped by owner)."""
        return np.searchsorted(self.owner, np.arange(self.num_requests + 1))

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """(P,) int64, where each piece begins within its request's tokens."""
        before = starts(self.sizes)
        return before - before[self._first[self.owner]] if len(self.owner) else before

    def select(self, rows) -> "Parts":
        """The pieces of ``rows`` (M,) (repeats allowed), as requests 0..M-1."""
        rows = np.asarray(rows, np.int64)
        count = self._first[rows + 1] - self._first[rows]
        idx = ranges(self._first[rows], count)
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), count)
        return Parts(owner, self.chunk[idx], self.starts[idx], self.sizes[idx], len(rows))

    def targets(self, first) -> np.ndarray:
        """(sum(sizes),) int64: where each token goes when request i's tokens start at ``first[i]``, piece after piece."""
        first = np.asarray(first, np.int64)
        return ranges(first[self.owner] + self.offsets, self.sizes)
