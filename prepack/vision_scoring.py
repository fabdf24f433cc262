"""Scoring continuations of chats with images: :func:`prepack.score` with ``processor=``.

A request is ``(chat, continuation)``: the chat goes through ``processor.apply_chat_template`` on its own
(generation prompt added, so the continuation is the assistant's answer), the continuation is a string
(its tokens are ``processor.tokenizer(continuation, add_special_tokens=False)``) or token ids. The
model runs on ``(context + continuation)[:-1]`` with the context's images, as in :func:`prepack.score`,
and only the continuation's positions reach the LM head. Each request runs whole: contexts with images
are not shared between requests (the scores are the same; only the work is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .inputs import _is_chat, _with_images
from .packing import token_array
from .vision import join


def score_with_images(model, requests: Sequence, processor, *, max_length: int | None, truncate: str, backend: str,
                      token_budget: int | None) -> list:
    """N ``(chat, continuation)`` pairs -> N :class:`prepack.scoring.Score`, each as the model gives it alone."""
    from .scoring import Score, _check_continuation_ids, _context_window, _score_spans

    if truncate != "error":
        raise ValueError(f"truncate={truncate!r} would cut a context with images; pass truncate='error' with processor=")
    limit = _context_window(model, max_length)
    parts, contexts, continuations = [], [], []
    for i, pair in enumerate(requests):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and _is_chat(pair[0])):
            raise ValueError(f"request {i}: with processor=, a request is a (chat, continuation) pair")
        chat, continuation = pair
        out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        if isinstance(continuation, str):
            continuation = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        cont = token_array(continuation, i)
        context = out["input_ids"][0]
        if len(cont) == 0:
            raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
        if limit is not None and len(context) + len(cont) - 1 > limit:
            raise ValueError(f"request {i} has {len(context) + len(cont) - 1} input tokens but the context window is {limit}")
        parts.append(_with_images(model, _extended(out, cont[:-1])))
        contexts.append(len(context))
        continuations.append(cont)
    if not parts:
        return []
    _check_continuation_ids(model, continuations)
    tokens = [t for p in parts for t in p.tokens]
    spans = np.array([(c - 1, c - 1 + len(t)) for c, t in zip(contexts, continuations)], np.int64)
    lp, greedy = _score_spans(model, tokens, spans, continuations, backend, token_budget, share_prefixes=False,
                              vision=join([p.vision for p in parts]))
    return [Score(float(a), bool(b)) for a, b in zip(lp, greedy)]


def _extended(out: Mapping, extra: np.ndarray) -> dict:
    """A one-request processor output with ``extra`` text tokens appended (their token types 0)."""
    ids = torch.cat([out["input_ids"][0], torch.from_numpy(extra)])[None]
    batch = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    for k in ("mm_token_type_ids", "token_type_ids"):
        if batch.get(k) is not None:
            batch[k] = torch.cat([batch[k][0], torch.zeros(len(extra), dtype=batch[k].dtype)])[None]
    return batch
