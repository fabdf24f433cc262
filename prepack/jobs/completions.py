"""Per-token log-probabilities of completions after their prompts: :func:`logprobs`, one packed forward.

What RL trainers compute for the old policy, the reference model and rollouts they score: for each
(prompt, completion) pair, ``log_softmax(logits / temperature)`` of every completion token given the
prompt and the completion tokens before it, and optionally the entropy of each of those distributions.
TRL's ``GRPOTrainer`` does it on a left-padded batch of prompt + completion; here the pairs are packed
(:func:`prepack.forward_at`), the LM head runs only at the positions that predict a completion token, and
each position's (V,) logits are reduced to two numbers before the next forward runs, so no (N, L, V)
tensor exists at any time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .outputs import forward_at


def logprobs(
    model,
    prompts: Sequence,
    completions: Sequence,
    *,
    temperature: float = 1.0,
    entropies: bool = False,
    backend: str = "auto",
    token_budget: int | None = None,
    share_prefixes: bool = True,
):
    """Log-probabilities (and entropies) of each completion token after its prompt, each pair as if alone.

    Args:
        model: a decoder-only transformers model (see :func:`prepack.prefill`); no gradients are kept.
        prompts: N prompts, token ids (a list of ints, (L,) array or tensor), each at least one token.
        completions: N completions, token ids (may be empty), completion ``i`` following prompt ``i``.
        temperature: the logits are divided by it before the softmax (TRL: the trainer's ``temperature``).
        entropies: also return each position's entropy ``-sum(p * log p)`` of the same tempered distribution.
        backend, token_budget, share_prefixes: as in :func:`prepack.forward_at` (a prompt that several
            completions share, such as the prompt of GRPO's ``num_generations`` samples, runs once).

    Returns:
        N float32 tensors, the i-th (len(completions[i]),): ``log p(completion[i][t] | prompt[i], completion[i][:t])``.
        With ``entropies=True``, a pair ``(logprobs, entropies)`` of such lists. For TRL's (N, C) layout
        (zero after each completion), ``torch.nn.utils.rnn.pad_sequence(result, batch_first=True)``.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(entropies, bool):
        raise ValueError(f"entropies must be True or False, got {entropies!r}")
    pairs = _pairs(model, prompts, completions)
    # each pair's last completion token predicts nothing asked for: it is not fed
    sequences = [np.concatenate([p, c[:-1]]) for p, c in pairs]
    spans = [(len(p) - 1, len(p) - 1 + len(c)) for p, c in pairs]
    device = next(model.parameters()).device
    targets = torch.from_numpy(np.concatenate([c for _, c in pairs]) if pairs else np.zeros(0, np.int64)).to(device)
    per_token = forward_at(
        model, sequences, spans, reduce=_reduce(targets, float(temperature), entropies),
        backend=backend, token_budget=token_budget, share_prefixes=share_prefixes,
    )
    lps = [v[:, 0].contiguous() for v in per_token]
    return (lps, [v[:, 1].contiguous() for v in per_token]) if entropies else lps


def _reduce(targets: torch.Tensor, temperature: float, entropies: bool):
    """(K, V) logits at asked positions -> (K, 1 or 2) float32 [log p(target), entropy], for ``forward_at(reduce=)``."""

    def reduce(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (K, V)
        out = [logp.gather(1, targets[rows][:, None])[:, 0]]
        if entropies:
            out.append(-(logp.exp() * logp).sum(-1))
        return torch.stack(out, 1)

    return reduce


def _pairs(model, prompts: Sequence, completions: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs as (L,) and (C,) int64 arrays; a bad one is refused, naming the request and the limit."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; give one completion per prompt")
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p, c = _ids(p, i, "prompt"), _ids(c, i, "completion")
        if not len(p):
            raise ValueError(f"request {i} has an empty prompt; its first completion token needs at least one token before it")
        for name, ids in (("prompt", p), ("completion", c)):
            if len(ids) and (ids.min() < 0 or vocab is not None and ids.max() >= vocab):
                raise ValueError(f"request {i}'s {name} has token id {int(ids.max() if ids.min() >= 0 else ids.min())} "
                                 f"outside the model's vocabulary [0, {vocab})")
        out.append((p, c))
    return out


def _ids(value, i: int, name: str) -> np.ndarray:
    """One request's token ids as (n,) int64; anything else refused."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"request {i}'s {name} must be a 1-D sequence of token ids, got {type(value).__name__} of shape {arr.shape}")
    return arr.astype(np.int64)
