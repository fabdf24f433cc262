"""Packed sequence classification, reward scoring and embeddings: a head on :func:`prepack.forward_at`'s hidden states.

A ``*ForSequenceClassification`` model (a reward model in TRL's sense is one
with ``num_labels=1``) scores the hidden state of one token per sequence, and
prepack takes the token the model's own head takes on that sequence alone: the
rightmost token that is not ``pad_token_id`` (the first when all are; the last
when no pad id is configured). So a reward prompt that ends in EOS, where pad =
EOS as in many Llama-style reward models, is scored at the token before its EOS,
as its own forward scores it. transformers refuses a batch larger than one when
no pad token is configured; a packed batch has no padding, so prepack needs none.

Embeddings pool the base model's last hidden state over each request's own
tokens: its last token, or the mean of all of them (what sentence-transformers
calls ``lasttoken`` and ``mean`` pooling, without a padding mask to get wrong).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from ..hf.inputs import check_prompts
from .outputs import forward_at
from ..hf.wrapped import unwrap

Pooling = Literal["last", "mean"]


def classify(
    model, sequences: Sequence, *, backend: str = "auto", token_budget: int | None = None, capacity: int | None = None,
    tokenizer=None, processor=None, share_prefixes: bool = True,
) -> torch.Tensor:
    """Sequence-classification (or reward) logits of each request, packed.

    Equal to the model's own forward on each sequence alone, and to its padded batched
    forward at each sequence's last real token.

    Args:
        model: a transformers ``*ForSequenceClassification`` model (Llama, Qwen2, Mistral,
            Gemma2, ...: the generic head ``model.score`` over ``model.model``); ``pad_token_id``
            may be unset.
        sequences: N requests, in any form :func:`prepack.prefill` takes (token ids, tokenizer
            output, strings or chats with ``tokenizer``).
        backend, token_budget, capacity, tokenizer, processor, share_prefixes: as in :func:`prepack.prefill`.

    Returns:
        (N, num_labels) float logits, in request order (a reward model's rewards are ``[:, 0]``).
    """
    head = classification_head(model)
    kwargs = dict(backend=backend, token_budget=token_budget, capacity=capacity, tokenizer=tokenizer, processor=processor,
                  share_prefixes=share_prefixes)
    pad = unwrap(model).config.get_text_config().pad_token_id
    if pad is None:  # the head's own rule without a pad id: the last token
        return forward_at(model, sequences, "last", output="hidden_states", reduce=lambda h, rows: head(h), **kwargs)
    # the head's own rule: the rightmost token that is not pad_token_id (position 0 when all are), so a request
    # ending in EOS where pad = EOS is scored where the model's forward scores it
    checked = check_prompts(model, sequences, tokenizer=tokenizer, processor=processor)
    spans = []
    for t in checked.tokens:
        real = np.flatnonzero(np.asarray(t) != pad)
        at = int(real[-1]) if len(real) else 0
        spans.append((at, at + 1))
    if not spans:
        return forward_at(model, [], "last", output="hidden_states", reduce=lambda h, rows: head(h), **kwargs)
    if checked.vision is None:  # the token ids already made: not tokenized twice
        sequences, kwargs["tokenizer"] = list(checked.tokens), None
    return torch.cat(forward_at(model, sequences, spans, output="hidden_states", reduce=lambda h, rows: head(h), **kwargs))


def classification_head(model) -> torch.nn.Module:
    """The score head of a transformers sequence-classification model; refuses any other model."""
    from transformers.modeling_layers import GenericForSequenceClassification

    model = unwrap(model)  # PEFT / torch.compile: the classifier underneath, whose injected adapters apply
    name = type(model).__name__
    if not isinstance(model, GenericForSequenceClassification):
        hint = " (this is a causal LM: score continuations with prepack.score, or embed with prepack.embed)" if name.endswith("ForCausalLM") else ""
        raise TypeError(
            f"{name} has no sequence-classification head that prepack knows; prepack.classify takes a "
            f"transformers *ForSequenceClassification model with the generic score head{hint}"
        )
    return model.score


def embed(
    model,
    sequences: Sequence,
    *,
    pooling: Pooling = "mean",
    normalize: bool = False,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    tokenizer=None,
    processor=None,
    share_prefixes: bool = True,
) -> torch.Tensor:
    """One vector per request from the base model's last hidden state, packed.

    Args:
        model: a decoder-only transformers model (a causal LM, a classifier or a bare
            ``*Model``); its base model's last hidden state is pooled.
        sequences: N requests, in any form :func:`prepack.prefill` takes (with ``tokenizer`` for text).
        pooling: ``"last"`` (the request's last token, whatever its id: decoder embedding models such as
            e5-mistral and gte-Qwen append an EOS and pool it, and sentence-transformers' ``lasttoken``
            pooling reads the attention mask, not the pad id) or ``"mean"`` (every token of the request,
            equally weighted).
        normalize: scale each vector to unit L2 norm.
        backend, token_budget, capacity, processor, share_prefixes: as in :func:`prepack.prefill` (with
            ``"mean"``, a shared prefix's hidden states are computed once and pooled into each request).

    Returns:
        (N, D) float, in request order.
    """
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    if pooling == "last":
        out = forward_at(
            model, sequences, "last", output="hidden_states", backend=backend, token_budget=token_budget,
            capacity=capacity, tokenizer=tokenizer, processor=processor, share_prefixes=share_prefixes,
        )
    else:
        parts = forward_at(
            model, sequences, "all", output="hidden_states", backend=backend, token_budget=token_budget,
            capacity=capacity, tokenizer=tokenizer, processor=processor, share_prefixes=share_prefixes,
        )
        lengths = np.array([len(p) for p in parts], np.int64)
        if len(parts):
            flat = torch.cat(parts)
            owner = torch.from_numpy(np.repeat(np.arange(len(parts)), lengths)).to(flat.device)
            sums = flat.new_zeros(len(parts), flat.shape[-1]).index_add_(0, owner, flat)
            out = sums / torch.from_numpy(lengths).to(flat)[:, None]
        else:  # no requests: (0, D), the width and dtype that "last" gives without running the model
            out = forward_at(model, [], "last", output="hidden_states")
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
