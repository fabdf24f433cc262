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

Dense masks are attention semantics and live in :mod:`prepack.attention`
(:func:`~prepack.attention.document_mask`); this module never imports torch.
"""

from __future__ import annotations

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
