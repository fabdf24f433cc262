"""Which of transformers' composed mask functions a packed layout already computes: plain causal masks.

transformers builds each layer's mask from a *mask function* ``(batch_idx, head_idx, q_idx, kv_idx) -> bool``
composed in ``masking_utils`` (``and_masks``, ``or_masks`` and overlays). prepack's attention computes a
causal mask, its sliding window or chunk, and the split into packed sequences from the call's layout, so
for those compositions no (T, T) mask need be built (``hf.prepack_mask`` returns None). Anything else
(bidirectional blocks over image tokens, padding, custom overlays) must be the model's own mask.

This module reads the composition the way transformers builds it: the ``__qualname__`` of each function and
the names its closure keeps (``mask_functions``, ``mask_function``, ``block_sequence_ids``). A function it
does not recognise is *not* plain causal, so a rename in transformers costs a built mask (a packed call is
then refused), never exactness. ``tests/test_other_families.py`` pins the names.
"""

from __future__ import annotations

import torch

# overlays that only restrict a causal mask to what the layout already knows: the layer's window, its chunk,
# the packed sequence a token belongs to (transformers' names, ``masking_utils``)
_RESTRICTIONS = ("sliding_window_overlay.", "chunked_overlay.", "packed_sequence_mask_function.")


def _closure(fn) -> dict:
    """The names ``fn``'s closure keeps -> their values ({} for a plain function)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _qualname(fn) -> str:
    return getattr(fn, "__qualname__", "") or ""


def _empty_blocks(fn) -> bool:
    """Whether ``fn`` is ``blockwise_overlay(block_sequence_ids)`` with no block (every id -1: a text-only call).

    The overlay unmasks (q, kv) pairs of one block of non-text tokens (``q_group == kv_group >= 0``); with no
    block it unmasks nothing, so ``or_masks(causal, it)`` is causal.
    """
    if not _qualname(fn).startswith("blockwise_overlay."):
        return False
    ids = _closure(fn).get("block_sequence_ids")
    return isinstance(ids, torch.Tensor) and not bool((ids >= 0).any())


def is_plain_causal(fn) -> bool:
    """Whether the mask function ``fn`` is causal attention within each packed sequence, possibly restricted
    to a sliding window or chunk: what prepack's packed attention computes without a mask.

    Recognised: ``causal_mask_function``; ``and_masks`` of a plain causal function with window, chunk and
    packed-sequence restrictions; ``remap_positions_for_packed_sequence`` of a plain causal function;
    ``or_masks`` of a plain causal function with image-block overlays that hold no block (a text-only prompt
    of a model with bidirectional attention over images: Gemma 3, Gemma 4 unified).
    """
    name = _qualname(fn)
    if name == "causal_mask_function":
        return True
    inner = _closure(fn) if "<locals>" in name else {}
    if name.startswith("and_masks."):
        parts = inner.get("mask_functions") or ()
        causal = [p for p in parts if is_plain_causal(p)]
        return bool(causal) and all(p in causal or _qualname(p).startswith(_RESTRICTIONS) for p in parts)
    if name.startswith("remap_positions_for_packed_sequence."):
        return is_plain_causal(inner.get("mask_function"))
    if name.startswith("or_masks."):
        parts = inner.get("mask_functions") or ()
        return bool(parts) and is_plain_causal(parts[0]) and all(_empty_blocks(p) for p in parts[1:])
    return False
