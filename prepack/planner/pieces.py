"""Cutting examples into pieces before they are placed: TRL's ``bfd_split`` and ``wrapped`` strategies.

numpy only. Both keep every token and keep the tokens in place: a piece is a run of consecutive
tokens of one example, so the pieces of N examples, back to back, are the examples' own flat
buffer, and only the lengths change::

    lengths  [9, 2, 5]      capacity 4
    split    [4, 4, 1, 2, 4, 1]       each example cut into capacity-long pieces, the rest last (bfd_split)
    wrapped  [4, 4, 1 | 2, 1 | 4]     the whole stream cut every capacity tokens (rows: [4], [4], [1, 2, 1], [4])

``source`` (P,) int64 gives each piece's example, so names, scalar columns and errors stay the example's.
"""

from __future__ import annotations

import numpy as np

from . import layout


def split(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each example longer than ``capacity`` into pieces of ``capacity`` tokens and one shorter rest, in order.

    TRL's ``pack_dataset(strategy="bfd_split")`` cuts at the same points; each piece is then placed as an
    example of its own.

    Args:
        lengths: (N,) int64, tokens of each example (>= 1).
        capacity: the row length C.

    Returns:
        pieces: (P,) int64, P = sum(ceil(lengths / C)), the pieces' lengths in stream order.
        source: (P,) int64, each piece's example.
    """
    lengths = np.asarray(lengths, np.int64)
    counts = -(-lengths // capacity)  # ceil
    source = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = layout.starts(counts)  # each example's first piece
    k = np.arange(len(source), dtype=np.int64) - np.repeat(first, counts)  # a piece's number within its example
    pieces = np.minimum(capacity, lengths[source] - k * capacity)
    return pieces, source


def wrap(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut the examples' concatenated stream every ``capacity`` tokens: TRL's ``strategy="wrapped"`` rows.

    The rows hold the same tokens as TRL's, cut at the same points, but each row also records where
    one example ends and the next begins (its pieces), so a padding-free batch keeps them apart;
    TRL's wrapped rows record no boundary and attend across examples.

    Args:
        lengths: (N,) int64, tokens of each example (>= 1).
        capacity: the row length C.

    Returns:
        pieces: (P,) int64, the pieces' lengths in stream order (a piece never crosses a row or an example).
        source: (P,) int64, each piece's example.
        row_counts: (R,) int64, R = ceil(sum(lengths) / C): pieces in each row (every row full but the last).
    """
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    cuts = np.union1d(ends, np.arange(capacity, total, capacity, dtype=np.int64))  # sorted, ends with total
    starts = np.concatenate([[0], cuts[:-1]]).astype(np.int64)
    pieces = cuts - starts
    source = np.searchsorted(ends, starts, side="right").astype(np.int64)
    row_counts = np.bincount(starts // capacity, minlength=-(-total // capacity)).astype(np.int64)
    return pieces, source, row_counts
