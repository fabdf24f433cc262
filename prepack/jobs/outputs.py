"""Outputs at chosen positions of each request: :func:`forward_at`, the public face of the packed forward.

``positions`` ("last", "all", or one ``(start, end)`` span per request) become (N, 2) spans;
:func:`~prepack.jobs.run.run_jobs` runs the requests through the executor (a shared prefix once, long
prompts in chunks) and returns the outputs at those spans only, request after request.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from ..planner import layout
from ..hf.model import Output, Reduce
from ..hf.inputs import check_prompts
from .run import run_jobs

Positions = Literal["last", "all"] | Sequence[tuple[int, int]]


def forward_at(
    model,
    sequences: Sequence,
    positions: Positions = "last",
    *,
    output: Output = "logits",
    reduce: Reduce | None = None,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    tokenizer=None,
    processor=None,
    share_prefixes: bool = True,
):
    """Run many sequences through ``model`` in one packed forward; return outputs at chosen positions.

    Exact against running each sequence alone: attention never crosses requests and position
    ids restart at 0 for each.

    Args:
        model: a decoder-only transformers model whose attention goes through ``AttentionInterface``.
        sequences: N requests, in any form :func:`prepack.prefill` takes (token ids, tokenizer
            output, strings or chats with ``tokenizer``).
        positions: ``"last"`` (each request's last token), ``"all"`` (every token), or N
            ``(start, end)`` spans, ``0 <= start <= end <= len(request)``, in each request's own
            token coordinates.
        output: ``"logits"`` (the model's LM head, computed only at those positions) or
            ``"hidden_states"`` (the base model's last hidden state, final norm applied).
        reduce: ``reduce(values, rows) -> (K, ...)``, applied to each forward's (K, V or D)
            outputs before the next forward runs, so that long outputs never pile up; ``rows``
            (K,) int64 says where each row lands in the request-order result.
        backend, token_budget, capacity, tokenizer, processor, share_prefixes: as in :func:`prepack.prefill`
            (a shared prefix runs once, up to the first position any request
            sharing it asks for: every asked position runs in its own request's segment).

    Returns:
        ``"last"``: an (N, X) tensor. Otherwise a list of N tensors, the i-th (end_i - start_i, X).
        X is V for logits, D for hidden states, or what ``reduce`` returns.
    """
    prompts = check_prompts(model, sequences, tokenizer=tokenizer, processor=processor)
    tokens = prompts.tokens
    lengths = layout.lengths_of(tokens)
    spans = request_spans(positions, lengths)
    run = run_jobs(
        model, tokens, backend=backend, token_budget=token_budget, capacity=capacity,
        spans=spans, output=output, reduce=reduce, lengths=lengths, share_prefixes=share_prefixes,
        vision=prompts.vision,
    )
    if isinstance(positions, str) and positions == "last":
        return run.values
    return list(run.values.split((spans[:, 1] - spans[:, 0]).tolist()))


def request_spans(positions: Positions, lengths: np.ndarray) -> np.ndarray:
    """``positions`` as (N, 2) int64 ``[start, end)`` per request; errors name the request and the limit."""
    n = len(lengths)
    if isinstance(positions, str):
        if positions == "last":
            return np.stack([lengths - 1, lengths], 1)
        if positions == "all":
            return np.stack([np.zeros(n, np.int64), lengths], 1)
        raise ValueError(f"positions must be 'last', 'all' or one (start, end) span per request, got {positions!r}")
    spans = np.asarray(positions, dtype=np.int64) if len(positions) else np.zeros((0, 2), np.int64)
    if spans.shape != (n, 2):
        raise ValueError(f"positions must hold one (start, end) span per request: got shape {spans.shape} for {n} requests")
    for i, (s, e) in enumerate(spans.tolist()):
        if not 0 <= s <= e <= lengths[i]:
            raise ValueError(f"request {i} has {lengths[i]} tokens but its span is ({s}, {e}); need 0 <= start <= end <= {lengths[i]}")
    return spans
