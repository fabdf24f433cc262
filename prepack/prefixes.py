"""Which token prefixes the requests of one call share, and which of them to run once (numpy only).

Chat traffic repeats a system prompt, few-shot evaluation its examples, agents their tool
descriptions. :func:`plan_prefixes` finds those prefixes and decides which to compute once:
each chosen prefix is prefilled once, and every request that starts with it runs only its
suffix, continuing the prefix's keys (:mod:`prepack.staged`).

How prefixes are found: sort the requests lexicographically; the longest common prefix of two
requests is then the minimum of the neighbours' longest common prefixes between them, so the
sorted order and the N - 1 neighbour LCPs describe the whole trie of shared prefixes.

The decision rule (a cost model with one knob): a request runs at most one shared prefix. For a
run of sorted neighbours, sharing their common prefix of ``p`` tokens among ``k`` of them saves
``(k - 1) * p`` tokens of compute; it costs one more segment in a forward (the suffix continues
the prefix's keys: a gather of ``p`` keys per request per layer) and, once per call, one more
forward stage. A prefix is shared when

* at least two requests start with it,
* it is at least ``min_tokens`` long (default :data:`MIN_SHARED_TOKENS`: below that the gather and
  the extra segment cost about what the saved tokens would), and
* choosing it saves more tokens than splitting its requests into longer-prefix groups would
  (a recursion over the trie: each group takes whichever of "share our common prefix" and
  "let the subgroups share their longer ones" saves more).

Every request keeps at least one token of its own (``limits``, default ``len - 1``): its last
token, whose logits are asked for, is always computed in its own segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MIN_SHARED_TOKENS = 32
_MAX_DEPTH = 64  # nested branching points the decision looks through (bounds the recursion)


@dataclass(frozen=True)
class PrefixPlan:
    """Which prefixes run once, and which requests continue them.

    Attributes:
        sources: (P,) int64, for each shared prefix a request that starts with it.
        prefix_lengths: (P,) int64, the tokens of each shared prefix (>= 1).
        prefix_of: (N,) int64, the shared prefix request i continues, or -1.
        shared: (N,) int64, how many leading tokens of request i its shared prefix covers (0 if none).
    """

    sources: np.ndarray
    prefix_lengths: np.ndarray
    prefix_of: np.ndarray
    shared: np.ndarray

    @property
    def num_prefixes(self) -> int:
        return len(self.sources)

    @property
    def tokens_saved(self) -> int:
        """Tokens not run thanks to sharing: every member's shared tokens, less each prefix run once."""
        return int(self.shared.sum() - self.prefix_lengths.sum())


def no_sharing(n: int) -> PrefixPlan:
    """The plan that shares nothing: each of ``n`` requests runs whole."""
    empty = np.zeros(0, np.int64)
    return PrefixPlan(empty, empty, np.full(n, -1, np.int64), np.zeros(n, np.int64))


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two 1-D token arrays share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


def plan_prefixes(
    tokens: Sequence[np.ndarray], *, limits: np.ndarray | None = None, min_tokens: int = MIN_SHARED_TOKENS
) -> PrefixPlan:
    """Choose the shared prefixes of ``tokens`` to run once (see the module docstring for the rule).

    Args:
        tokens: N 1-D int64 token arrays.
        limits: (N,) int64, at most how many leading tokens of request i may be shared
            (default ``len - 1``: the last token stays in the request's own segment).
        min_tokens: the shortest prefix worth sharing (>= 1).

    Returns:
        A :class:`PrefixPlan`; ``tokens[i][:shared[i]]`` equals ``tokens[sources[prefix_of[i]]][:shared[i]]``.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    n = len(tokens)
    lengths = np.fromiter((len(t) for t in tokens), np.int64, n)
    limits = np.maximum(lengths - 1, 0) if limits is None else np.minimum(np.asarray(limits, np.int64), np.maximum(lengths - 1, 0))
    eligible = np.flatnonzero(limits >= min_tokens)
    if len(eligible) < 2:
        return no_sharing(n)
    # lexicographic order of the eligible requests (only their first max(limit) tokens matter)
    order = sorted(eligible.tolist(), key=lambda i: tokens[i][: limits[i]].tolist())
    order = np.asarray(order, np.int64)
    # lcp[j]: tokens that order[j] and order[j + 1] may share (a common prefix, within both limits)
    lcp = np.array(
        [min(common_prefix_length(tokens[a], tokens[b]), limits[a], limits[b]) for a, b in zip(order[:-1], order[1:])],
        np.int64,
    )
    groups: list[tuple[int, int, int]] = []  # (first, last) positions in `order`, inclusive, and the prefix length
    _choose(lcp, 0, len(order) - 1, min_tokens, groups)
    prefix_of, shared = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    sources, prefix_lengths = [], []
    for j, (a, b, p) in enumerate(groups):
        members = order[a : b + 1]
        prefix_of[members], shared[members] = j, p
        sources.append(int(members[0]))
        prefix_lengths.append(p)
    return PrefixPlan(np.asarray(sources, np.int64), np.asarray(prefix_lengths, np.int64), prefix_of, shared)


def _choose(lcp: np.ndarray, a: int, b: int, min_tokens: int, out: list, depth: int = 0) -> int:
    """Best groups among sorted requests a..b (inclusive); appends them to ``out``, returns the tokens saved.

    The requests a..b share ``min(lcp[a:b])`` tokens. Either all of them share that prefix, or the
    run splits where the neighbour LCP is that minimum and each part chooses for itself (a part of
    one request shares nothing). Past :data:`_MAX_DEPTH` nested branching points a run takes its
    common prefix without looking deeper (it stays correct, only maybe less thrifty).
    """
    if a >= b:
        return 0
    p = int(lcp[a:b].min())
    if p < min_tokens:  # no common prefix worth sharing among all: only the parts can share
        return _split(lcp, a, b, p, min_tokens, out, depth) if depth < _MAX_DEPTH else 0
    whole = (b - a) * p
    parts: list = []
    deeper = p < int(lcp[a:b].max()) and depth < _MAX_DEPTH
    saved = _split(lcp, a, b, p, min_tokens, parts, depth) if deeper else 0
    if saved > whole:
        out.extend(parts)
        return saved
    out.append((a, b, p))
    return whole


def _split(lcp: np.ndarray, a: int, b: int, p: int, min_tokens: int, out: list, depth: int) -> int:
    """Cut a..b where the neighbour LCP equals ``p`` (the run's minimum) and let each part choose."""
    cuts = [a + int(j) for j in np.flatnonzero(lcp[a:b] == p)]
    saved, start = 0, a
    for end in cuts + [b]:
        saved += _choose(lcp, start, end, min_tokens, out, depth + 1)
        start = end + 1
    return saved
