"""Which requests of a decode-engine call share a prompt prefix held once (and whether the model allows it).

The rule, applied when a request is admitted:

1. If a prefix region is live (held for requests admitted earlier) and is a proper prefix of the
   request's prompt, the request reads it; the longest such region wins.
2. Otherwise the request's prompt is compared with the prompts waiting behind it (the engine's
   read-ahead, ``2 * max_batch`` or 128 requests). For each length ``L`` that is the longest common
   prefix with some waiting prompt, ``k(L)`` waiting prompts share at least ``L`` tokens; the length
   that saves most, ``max L * k(L)``, becomes a new region when it has at least
   :data:`MIN_SHARED_TOKENS` tokens. Later requests then find it by rule 1.

A region always stops at least one token short of every sharer's prompt, so each request still
feeds its own last prompt token and gets its first logits from it (the samples of one prompt, which
share all of it, share all but its last token). One level only: a request reads at most one region
(no tree of nested prefixes, as SGLang's radix cache keeps).
"""

from __future__ import annotations

import numpy as np

from .hf import attention_needs

MIN_SHARED_TOKENS = 32  # below this a region saves less than the extra attention part costs


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two (L,) int64 token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def live_match(prompt: np.ndarray, live: dict) -> int | None:
    """The key of the longest live region (key -> (L,) tokens) that is a proper prefix of ``prompt``, or None."""
    best, best_len = None, 0
    for key, tokens in live.items():
        n = len(tokens)
        if best_len < n < len(prompt) and np.array_equal(prompt[:n], tokens):
            best, best_len = key, n
    return best


def new_region_length(prompt: np.ndarray, others, min_tokens: int = MIN_SHARED_TOKENS) -> int:
    """Tokens of ``prompt`` worth holding once for the waiting prompts ``others`` (0: none), by ``max L * k(L)``."""
    lengths = np.array([min(common_prefix(prompt, o), len(o) - 1, len(prompt) - 1) for o in others], np.int64)
    lengths = lengths[lengths >= min_tokens]
    if not len(lengths):
        return 0
    values = np.unique(lengths)
    sharing = (lengths[None, :] >= values[:, None]).sum(1)  # k(L) for each candidate L
    return int(values[np.argmax(values * sharing)])


def sharing_refusal(model, rope) -> str | None:
    """Why requests of ``model`` cannot share a prefix region exactly (None: they can).

    Every sharer must see all of the prefix's keys, exactly as the model computes them alone: no
    sliding window or chunk may hide some, no soft-cap or sink may enter the merged softmax, and the
    rotary frequencies must not depend on the request's length (:mod:`prepack.rope`).
    """
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
