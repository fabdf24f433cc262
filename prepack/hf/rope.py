"""RoPE whose frequencies depend on the length of the forward: which requests may share one.

transformers' ``dynamic_rope_update`` (the decorator on most rotary embeddings'
``forward``) recomputes the rotary frequencies from ``max(position_ids) + 1``, the
longest sequence in the forward:

* ``longrope`` (Phi-3, Phi-4-mini): short factors up to ``original_max_position_embeddings``,
  long factors past it;
* ``dynamic`` (NTK): frequencies rescaled to the sequence length once it passes
  ``max_position_embeddings``, and *kept* (the module remembers the longest length seen).

In a packed forward that length is the longest request's, so a short prompt beside a long
one would get the long prompt's frequencies. prepack therefore puts requests into the same
forward only where the frequencies they would get alone are equal (:func:`rope_groups`), and
refuses requests whose frequencies depend on the module's history (``dynamic`` past its
original length: :func:`RopeDependence.refusal`).

Detection reads the model, not a list of names: every module whose ``forward`` is wrapped by
``dynamic_rope_update`` and whose RoPE function (``ROPE_INIT_FUNCTIONS[rope_type]``) gives
different frequencies for different sequence lengths is length-dependent, so a new RoPE type of
that kind is caught too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

from ..planner.bins import Plan, plan
from .support import UnsupportedModelError

# lengths at which a RoPE function is probed for length dependence, relative to its thresholds
_PROBE_FACTORS = (0, 1, 2, 4, 16)


@functools.lru_cache(maxsize=1)
def _update_code():
    """The code object of ``dynamic_rope_update``'s wrapper: every decorated ``forward`` shares it."""
    try:
        from transformers.modeling_rope_utils import dynamic_rope_update
    except ImportError:  # pragma: no cover - older transformers
        return None
    return dynamic_rope_update(lambda self, x, position_ids: None).__code__


def _is_updated(module) -> bool:
    """Whether ``module``'s class ``forward`` recomputes its frequencies per call (``dynamic_rope_update``)."""
    fn = getattr(type(module), "forward", None)
    code = _update_code()
    return code is not None and getattr(fn, "__code__", None) is code


@dataclass(frozen=True)
class _Rope:
    """One length-dependent RoPE of a model: a rotary module and (for per-layer-type modules) its layer type."""

    name: str  # e.g. "Phi3RotaryEmbedding (rope_type 'longrope')"
    fn: Callable
    config: object
    layer_type: str | None
    stateful_after: int | None  # 'dynamic': past this many tokens the frequencies depend on the module's history

    def frequencies(self, seq_len: int) -> bytes:
        inv_freq, scaling = self.fn(self.config, "cpu", seq_len=int(seq_len), **self._layer_kwarg())
        return inv_freq.float().numpy().tobytes() + np.float64(scaling).tobytes()

    def _layer_kwarg(self) -> dict:
        return {} if self.layer_type is None else {"layer_type": self.layer_type}


@dataclass(frozen=True, eq=False)
class RopeDependence:
    """The length-dependent RoPEs of a model.

    ``key(n)`` is equal for two sequence lengths exactly when a forward of either length gets the
    same rotary frequencies (and attention scaling) in every length-dependent rotary module.
    """

    ropes: tuple

    @functools.cached_property
    def _keys(self) -> dict:
        return {}

    def key(self, seq_len: int) -> Hashable:
        seq_len = int(seq_len)
        if seq_len not in self._keys:
            self._keys[seq_len] = tuple(r.frequencies(seq_len) for r in self.ropes)
        return self._keys[seq_len]

    def refusal(self, seq_len: int) -> str | None:
        """Why a request whose forward reaches ``seq_len`` positions has no as-if-alone result, or None."""
        for r in self.ropes:
            if r.stateful_after is not None and seq_len > r.stateful_after:
                return (
                    f"{r.name} rescales its frequencies to the longest sequence it has seen past "
                    f"{r.stateful_after} positions and keeps them (transformers' dynamic_rope_update), so a "
                    f"sequence of {seq_len} positions gets frequencies that depend on earlier calls, not on itself: "
                    f"prepack packs such a model only for sequences of at most {r.stateful_after} positions"
                )
        return None

    def describe(self) -> str:
        return ", ".join(sorted({r.name for r in self.ropes}))


def rope_dependence(model) -> RopeDependence | None:
    """The RoPEs of ``model`` whose frequencies depend on the forward's sequence length, or None if none do."""
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:  # pragma: no cover - older transformers
        return None
    found = []
    for module in model.modules():
        types = getattr(module, "rope_type", None)
        if types is None or not _is_updated(module):
            continue
        per_layer = types if isinstance(types, dict) else {None: types}
        for layer_type, rope_type in per_layer.items():
            fn = ROPE_INIT_FUNCTIONS.get(rope_type)
            if fn is None:  # "default" and other fixed frequencies: computed once at init
                continue
            stateful = None
            if "dynamic" in rope_type:  # the branch dynamic_rope_update takes: grows and keeps frequencies
                stateful = int(getattr(module, "original_max_seq_len", 0) or 0) or None
            rope = _Rope(f"{type(module).__name__} (rope_type {rope_type!r})", fn, module.config, layer_type, stateful)
            if _depends_on_length(rope, module.config, layer_type):
                found.append(rope)
    return RopeDependence(tuple(found)) if found else None


def _depends_on_length(rope: _Rope, config, layer_type) -> bool:
    """Whether the RoPE function gives different frequencies at different lengths (probed around its thresholds)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    marks = {int(getattr(config, "max_position_embeddings", 0) or 0), int(params.get("original_max_position_embeddings") or 0)}
    lengths = sorted({max(1, m * f + d) for m in marks if m for f in _PROBE_FACTORS for d in (0, 1)} | {1, 2})
    first = rope.frequencies(lengths[0])
    return any(rope.frequencies(n) != first for n in lengths[1:])


def check_lengths(model, seq_lens: np.ndarray, ids: np.ndarray | None = None) -> RopeDependence | None:
    """Refuse requests whose RoPE frequencies have no as-if-alone value; return the model's :class:`RopeDependence`.

    Args:
        seq_lens: (N,) int64, the positions each request's own forward reaches (its length, plus
            any prefix it continues).
        ids: (N,) the request numbers to name in errors (default ``arange(N)``).
    """
    dep = rope_dependence(model)
    if dep is None:
        return None
    for j, n in enumerate(np.asarray(seq_lens).tolist()):
        why = dep.refusal(n)
        if why:
            i = j if ids is None else int(ids[j])
            raise UnsupportedModelError(f"request {i} has {n} tokens but {type(model).__name__}'s {why}")
    return dep


def rope_groups(model, seq_lens: np.ndarray, ids: np.ndarray | None = None) -> list[np.ndarray] | None:
    """Requests that may share a forward: each group's sequence lengths give equal rotary frequencies.

    Args:
        seq_lens: (N,) int64, the positions each request's forward reaches alone (see :func:`check_lengths`).

    Returns:
        None when every request may share a forward with every other (no length-dependent RoPE, or
        all in one regime); else the groups, each (n_g,) int64 indices into ``seq_lens``, ascending.
    """
    dep = check_lengths(model, seq_lens, ids)
    if dep is None or len(seq_lens) == 0:
        return None
    keys: dict = {}
    for j, n in enumerate(np.asarray(seq_lens).tolist()):
        keys.setdefault(dep.key(n), []).append(j)
    if len(keys) == 1:
        return None
    return [np.asarray(g, np.int64) for g in keys.values()]


def grouped_plan(lengths: np.ndarray, capacity: int, groups: list[np.ndarray]) -> tuple[Plan, list[int]]:
    """One :class:`~prepack.planner.Plan` whose rows hold requests of one group each.

    Args:
        lengths: (N,) int64 tokens per request.
        capacity: tokens per row.
        groups: index arrays partitioning ``arange(N)`` (see :func:`rope_groups`).

    Returns:
        The plan, and the row where each group starts, plus ``num_rows`` at the end: a forward
        takes rows from one group only.
    """
    row, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    bounds = [0]
    for g in groups:
        p = plan(lengths[g], capacity)
        row[g], offset[g] = p.row + bounds[-1], p.offset
        bounds.append(bounds[-1] + p.num_rows)
    return Plan(lengths, row, offset, capacity, bounds[-1]), bounds
