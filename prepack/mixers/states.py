"""Where a packed prefill keeps each request's mixer states: one cache of the model's own class per request.

A packed call's :class:`SegmentCaches` hands each segment a fresh cache of the model's own class
(transformers' ``DynamicCache`` for the model's config: ``LinearAttentionLayer`` for gated delta-net
and short-convolution layers, plain layers for attention). The mixer's own forward, run on that
segment alone, writes its final convolution window and recurrent state into it, exactly as
``model(prompt, cache=DynamicCache(config=config))`` would. Attention layers stay empty here; prepack
adds each request's keys and values from the packed stream afterwards (:func:`with_keys`).
"""

from __future__ import annotations

import copy
import functools
import sys

import numpy as np
import torch


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


def keyless_layers(model) -> frozenset[int]:
    """The decoder layers of ``model`` that cache no keys where it has mixers: the mixers' and the MLP-only ones
    (NemotronH's); empty for a model without mixers (every layer holds attention keys)."""
    from ..hf.support import stateless_layers
    from ..hf.wrapped import unwrap

    mixers = layer_indices(model)
    return frozenset(mixers | stateless_layers(unwrap(model))) if mixers else frozenset()


def layer_indices(model) -> frozenset[int]:
    """The decoder layers of ``model`` whose token mixer is a registered mixer (they cache no keys)."""
    from .kinds import mixer_modules

    from .kinds import mixer_layer_idx

    return frozenset(i for _, m, _ in mixer_modules(model) if (i := mixer_layer_idx(m)) is not None)



class HeldStates:
    """The decode engine's mixer states: one cache of the model's own class per running request and prefix region.

    A request's cache holds its conv and recurrent states (its attention keys live in the engine's
    :class:`~prepack.executor.kvstore.KVStore`); the mixers' own code reads and updates it at every step the
    request feeds, exactly as ``model.generate`` updates the cache of that prompt alone. A request (or child
    region) that continues a prefix region starts from a copy of the region's final states, so samples of one
    prompt share its prefill; a region must be complete before anything continues it (the scheduler's
    ``parent_first``). :meth:`drop` frees a key's states with its keys.

    Args:
        config: the model's text config (its ``DynamicCache`` layout).
        prefix_of: request or region -> the prefix region it continues (the store's live mapping).
    """

    def __init__(self, config, prefix_of: dict):
        self.config, self.prefix_of = config, prefix_of
        self.held: dict[int, object] = {}

    def has(self, key: int) -> bool:
        """Whether ``key`` continues states (its own, or the prefix region's it starts from)."""
        return key in self.held or self.prefix_of.get(key) is not None

    def cache_of(self, key: int):
        """``key``'s cache: its own, else a copy of its prefix region's, else a new one (a prompt from zero state)."""
        cache = self.held.get(key)
        if cache is None:
            parent = self.prefix_of.get(key)
            if parent is None:
                cache = new_cache(self.config)
            elif parent not in self.held:
                raise RuntimeError(f"unit {key} continues prefix region {parent}, whose states were never computed (a scheduling bug)")
            else:
                cache = copy.deepcopy(self.held[parent])
            self.held[key] = cache
        return cache

    def drop(self, keys) -> None:
        for key in keys:
            self.held.pop(key, None)

    def for_step(self, keys: list[int], q_lengths: np.ndarray) -> "StepStates":
        """The :class:`MixerStates` of one forward whose segments with queries are ``keys``' (in stream order)."""
        with_queries = np.flatnonzero(np.asarray(q_lengths) > 0)
        if len(with_queries) != len(keys):
            raise RuntimeError(f"a step of {len(keys)} units laid out {len(with_queries)} segments with queries")
        return StepStates(self, dict(zip(with_queries.tolist(), keys)))


class StepStates:
    """One engine step's :class:`prepack.mixers.MixerStates`: segment -> its unit's held cache.

    Besides ``cache_for``, it gathers the one-token segments that continue states into one batched cache
    for a layer (:meth:`gather`), so that a mixer decodes all running requests in one call of its own
    forward, and writes their new states back (:meth:`scatter`).
    """

    def __init__(self, held: HeldStates, keys: dict[int, int]):
        self.held, self.keys = held, keys

    def cache_for(self, segment: int):
        return self.held.cache_of(self.keys[segment])

    def continues(self, segment: int) -> bool:
        return self.held.has(self.keys[segment])

    def groups(self, segments: list[int], layer: int) -> list[list[int]]:
        """``segments`` grouped by which of layer ``layer``'s states their caches hold (a one-token prompt's first
        call may leave some unset): each group of two or more decodes in one call; the rest run on their own."""
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        by: dict = {}
        for j in segments:
            cache = self.cache_for(j)
            if type(cache) is not DynamicCache or not isinstance(cache.layers[layer], LinearAttentionCacheLayerMixin):
                return []  # a model's own cache class (MiniMax's) holds its states elsewhere: each decodes on its own
            own = cache.layers[layer]
            held = (tuple(own.is_conv_states_initialized.values()), tuple(own.is_recurrent_states_initialized.values()))
            if any(held[0]) or any(held[1]):
                by.setdefault(held, []).append(j)
        return [g for g in by.values() if len(g) > 1]

    def gather(self, segments: list[int], layer: int):
        """A cache of the model's own class whose layer ``layer`` holds the segments' states stacked on the batch axis."""
        from transformers import DynamicCache

        caches = [self.cache_for(j) for j in segments]
        batched = DynamicCache(config=self.held.config)
        into, first = batched.layers[layer], caches[0].layers[layer]
        for s in range(first.number_of_states):
            if first.is_conv_states_initialized[s]:
                stacked = torch.cat([c.layers[layer].conv_states[s] for c in caches])
                into.update_conv_state(stacked, state_idx=s, conv_kernel_size=first.conv_kernel_size[s])
            if first.is_recurrent_states_initialized[s]:
                into.update_recurrent_state(torch.cat([c.layers[layer].recurrent_states[s] for c in caches]), state_idx=s)
        return batched

    def scatter(self, segments: list[int], layer: int, batched) -> None:
        """Write each segment's new states of ``layer`` from ``batched`` (see :meth:`gather`) back into its own cache."""
        source = batched.layers[layer]
        for b, j in enumerate(segments):
            own = self.cache_for(j).layers[layer]
            for s in range(own.number_of_states):
                if own.is_conv_states_initialized[s]:
                    own.conv_states[s].copy_(source.conv_states[s][b : b + 1])
                if own.is_recurrent_states_initialized[s]:
                    own.recurrent_states[s].copy_(source.recurrent_states[s][b : b + 1])
