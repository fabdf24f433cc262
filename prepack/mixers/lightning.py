"""Lightning (linear) attention, MiniMax's, as a :mod:`prepack.mixers` kind.

MiniMax-Text alternates ``full_attention`` layers (plain attention through ``AttentionInterface``, packed
like any other) with ``linear_attention`` layers, ``MiniMaxLightningAttention``: a decayed linear attention
whose state is one ``(H, D, D)`` matrix of keys times values per request. Over a prompt it runs in blocks
of ``block_size`` tokens (the state carried from block to block); with a state in the cache it runs token
by token (decode). Packed naively the state would carry one prompt into the next.

The decoder layers pass their ``**kwargs`` on to it, so ``prepack=`` reaches it, and its forward takes
the model's cache as ``cache``: the packed call runs it once per segment (:func:`prepack.mixers.run_segments`),
each segment through its own code from zero state, into that segment's own cache. Its model requires its
own cache class, ``MiniMaxCache`` (a ``DynamicCache`` with a ``linear_cache`` list beside the layers):
:func:`prepack.mixers.states.new_cache` makes one (the only ``DynamicCache`` subclass its modeling file
defines), so each request's cache is the class ``model(prompt, use_cache=True)`` returns.

The module returns ``(output, final state)`` and its decoder layer keeps the output only: ``returns_state``.
"""

from __future__ import annotations

from .kinds import MixerKind, register_kind


def _is_lightning(module) -> bool:
    return type(module).__name__.endswith("LightningAttention") and all(
        hasattr(module, a) for a in ("qkv_proj", "output_gate", "slope_rate", "block_size", "layer_idx")
    )


LIGHTNING_ATTENTION = register_kind(MixerKind(
    name="lightning_attention",
    matches=_is_lightning,
    layer_types=("linear_attention",),
    states=("recurrent",),
    returns_state=True,
))
