"""Where a packed prefill keeps each request's mixer states: one cache of the model's own class per request.

A packed call's :class:`SegmentCaches` hands each segment a fresh cache of the model's own class
(transformers' ``DynamicCache`` for the model's config: ``LinearAttentionLayer`` for gated delta-net
and short-convolution layers, plain layers for attention). The mixer's own forward, run on that
segment alone, writes its final convolution window and recurrent state into it, exactly as
``model(prompt, cache=DynamicCache(config=config))`` would. Attention layers stay empty here; prepack
adds each request's keys and values from the packed stream afterwards (:func:`with_keys`).
"""

from __future__ import annotations

import functools
import sys


class SegmentCaches:
    """A :class:`prepack.mixers.MixerStates` that makes one cache per segment, on first use.

    Attributes:
        caches: segment -> its cache (only segments whose mixers ran: an empty prompt has none).
    """

    def __init__(self, config):
        self.config = config
        self.caches: dict[int, object] = {}

    def cache_for(self, segment: int):
        cache = self.caches.get(segment)
        if cache is None:
            cache = self.caches[segment] = new_cache(self.config)
        return cache


def own_cache_class(config) -> type | None:
    """The cache class ``config``'s modeling file defines for its model (MiniMax's ``MiniMaxCache``, which its model
    requires), or None where the model uses transformers' ``DynamicCache``.

    Read from the modeling file beside the config's (``configuration_x`` -> ``modeling_x``): the one subclass of
    ``DynamicCache`` defined there. Two such classes: neither is taken (ambiguous, the model's ``DynamicCache`` then).
    """
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    modeling = sys.modules.get(name) if name != type(config).__module__ else None
    return None if modeling is None else _defined_cache_class(modeling)  # not imported: no model of it was built


@functools.lru_cache(maxsize=None)
def _defined_cache_class(modeling) -> type | None:
    import inspect

    from transformers import DynamicCache

    found = [c for c in vars(modeling).values() if inspect.isclass(c) and issubclass(c, DynamicCache)
             and c is not DynamicCache and c.__module__ == modeling.__name__]
    return found[0] if len(found) == 1 else None


def new_cache(config):
    """A fresh cache of the model's own class for ``config``: its modeling file's own (:func:`own_cache_class`), else
    ``DynamicCache(config=config)``, as the model itself makes one for ``use_cache=True``."""
    import inspect

    from transformers import DynamicCache

    cls = own_cache_class(config)
    if cls is None:
        return DynamicCache(config=config)
    return cls(config=config) if "config" in inspect.signature(cls.__init__).parameters else cls()


class MixerCapture(list):
    """One forward's per-layer (keys, values) (None for a mixer layer), with each request's mixer states.

    Attributes:
        states: where a request's segment starts in the forward's flattened token axis -> its cache
            (:class:`SegmentCaches`), holding the mixer layers' final conv and recurrent states.
    """

    def __init__(self, layers: list, states: dict):
        super().__init__(layers)
        self.states = states


def with_keys(cache, layers: list):
    """``cache`` (a request's mixer states, or None) with each attention layer's keys and values added.

    Args:
        layers: per layer (keys, values) each (1, H_kv, L, D), or None for a mixer layer.

    Returns:
        the model's own cache class holding the request's whole prompt: mixer states and attention keys.
    """
    if cache is None:
        raise ValueError("a request with mixer layers has no states (an empty prompt?)")
    for i, kv in enumerate(layers):
        if kv is not None:
            cache.update(kv[0], kv[1], i)
    return cache


def layer_indices(model) -> frozenset[int]:
    """The decoder layers of ``model`` whose token mixer is a registered mixer (they cache no keys)."""
    from .kinds import mixer_modules

    from .kinds import mixer_layer_idx

    return frozenset(i for _, m, _ in mixer_modules(model) if (i := mixer_layer_idx(m)) is not None)

