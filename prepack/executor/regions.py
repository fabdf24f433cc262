"""Which requests of an executor run share prompt prefixes held once, at any depth (and whether the model allows it).

Shared prefixes form a tree of regions (like SGLang's radix tree): a region holds the keys of
``tokens[start:end]`` of the prompts that share them, and continues its parent region (the prompt's
first ``start`` tokens). A GRPO batch, for instance, has a few-shot header shared by every prompt, then
each prompt shared by its G samples: the header is one region, each prompt's remainder a child of it,
and each sample reads both before its own keys. The rule, applied when a request is admitted:

1. The deepest live region whose tokens are a prefix of the request's prompt (its whole prompt
   included) is where the request starts; its ancestors come with it.
2. From there the prompt is compared with the prompts waiting behind it (the engine's read-ahead,
   ``2 * max_batch`` or 128 requests). For each length ``L`` past the matched ``M`` that is the longest
   common prefix with some waiting prompt, ``k(L)`` waiting prompts share at least ``L`` tokens; the
   length that saves most, ``max (L - M) * k(L)``, becomes a new child region when it adds at least
   :data:`MIN_SHARED_TOKENS` tokens, or when it reaches the end of the prompt (the samples of one
   prompt share all of it, however short). Step 2 repeats from the new region, so one admission may
   open a header region and a prompt region under it. Later requests find them by rule 1.

A request whose whole prompt is a region feeds no prompt token of its own: its first token is chosen
from the region's last-token logits (each sample with its own processors and generator), so a prompt
shared by its samples runs once, its last token included.
"""

from __future__ import annotations

import numpy as np

from ..hf.registration import attention_needs
from ..mixers import continuation_refusal

MIN_SHARED_TOKENS = 32  # below this a region saves less than the extra attention part costs


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two 1-D token arrays share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


def live_match(prompt: np.ndarray, live: dict) -> int | None:
    """The key of the longest live region (key -> (L,) tokens) that is a prefix of ``prompt`` (or all of it), or None."""
    best, best_len = None, 0
    for key, tokens in live.items():
        n = len(tokens)
        if best_len < n <= len(prompt) and np.array_equal(prompt[:n], tokens):
            best, best_len = key, n
    return best


def next_region_end(prompt: np.ndarray, matched: int, others, min_tokens: int = MIN_SHARED_TOKENS) -> int:
    """Where a new region continuing ``prompt[:matched]`` should end for the waiting prompts ``others`` (0: none).

    The end ``L`` maximises ``(L - matched) * k(L)``, ``k(L)`` the waiting prompts sharing at least ``L``
    tokens with ``prompt``; it must add ``min_tokens`` tokens, unless it is the whole prompt.
    """
    lengths = np.array([common_prefix_length(prompt, o) for o in others], np.int64)
    lengths = lengths[(lengths - matched >= min_tokens) | ((lengths == len(prompt)) & (lengths > matched))]
    if not len(lengths):
        return 0
    values = np.unique(lengths)
    sharing = (lengths[None, :] >= values[:, None]).sum(1)  # k(L) for each candidate L
    return int(values[np.argmax((values - matched) * sharing)])


def sharing_refusal(model, rope) -> str | None:
    """Why requests of ``model`` cannot share a prefix region exactly (None: they can).

    Every sharer must see all of the prefix's keys, exactly as the model computes them alone: no
    sliding window or chunk may hide some, no soft-cap or sink may enter the merged softmax, and the
    rotary frequencies must not depend on the request's length (:mod:`prepack.hf.rope`).
    """
    return continuation_refusal(model) or merge_refusal(model, rope)


def merge_refusal(model, rope) -> str | None:
    """Why ``model``'s attention over a prefix region and a request's own keys cannot be merged from the two parts
    exactly (None: it can). A model with token mixers outside attention also needs the region's final states
    (the decode engine keeps them: :class:`prepack.mixers.states.HeldStates`)."""
    needs = attention_needs(model)
    if rope is not None:
        return "its rotary frequencies depend on the sequence length"
    if needs.window:
        return "it has sliding-window or chunked attention layers"
    if needs.softcap:
        return "its attention soft-caps logits"
    if needs.sinks:
        return "its attention has sinks"
    return None
