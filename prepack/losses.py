"""Losses over padding-free packed batches that equal the unpacked definitions.

A batch of :class:`prepack.DataCollatorForPackedRows` is one (1, T) row of S sequences, with
unshifted ``labels`` that are -100 on every sequence's first token, so shifting them (as causal
LMs do) never asks one sequence to predict the next one's first token. Two normalisations:

* **token-mean** (transformers' and TRL's default): every predicted token weighs the same across the
  global batch (all micro-steps of an optimizer step, all ranks). It is what a causal LM computes
  when given ``num_items_in_batch``, the global count of predicted tokens, which ``Trainer`` counts
  and passes itself; :func:`token_mean_loss` is that loss for your own loop, and
  :func:`num_predicted_tokens` the count to sum over micro-steps and ranks. Packing does not change it.
* **sequence-mean**: every example weighs the same, whatever its length: the mean over the global
  batch's sequences of each sequence's own token-mean. It needs each sequence's own token count, so
  it reads ``cu_seq_lens_q``: :func:`sequence_mean_loss`, normalised by :func:`num_sequences`
  summed over micro-steps and ranks.

Both return a sum divided by a *global* count, so the gradients of the micro-steps and ranks add up
to the gradient of the whole batch (with DDP, which averages gradients over ranks, multiply by the
world size, as ``Trainer`` does with ``average_tokens_across_devices``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """labels (1, T) -> the label each position predicts, (T,): the next token's, -100 at the end."""
    return F.pad(labels.reshape(-1)[1:], (0, 1), value=IGNORE_INDEX)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position against the next token, 0 where that label is -100.

    Args:
        logits: (1, T, V).
        labels: (1, T) int64, unshifted, -100 at each sequence's first token and where not trained on.

    Returns:
        (T,) float32.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), _shifted(labels), reduction="none")


def num_predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens a batch trains on (labels (1, T) or (B, L)): int64 scalar, what ``Trainer`` sums into
    ``num_items_in_batch`` (it counts ``labels[..., 1:]``)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def token_mean_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Sum of the batch's token losses over the global token count: the unpacked token-mean's share.

    Args:
        logits: (1, T, V).
        labels: (1, T) int64, unshifted (the collator's).
        num_items_in_batch: predicted tokens in the global batch (:func:`num_predicted_tokens` summed
            over micro-steps and ranks); None: this batch's own.

    Returns:
        A float32 scalar.
    """
    total = num_predicted_tokens(labels) if num_items_in_batch is None else num_items_in_batch
    return token_losses(logits, labels).sum() / total


def num_sequences(labels: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Sequences of a packed batch with at least one predicted token: int64 scalar (the sequence-mean's count).

    Args:
        labels: (1, T) int64, unshifted.
        cu_seq_lens: (S + 1,) int32, the collator's ``cu_seq_lens_q``.
    """
    return (_per_sequence(_shifted(labels) != IGNORE_INDEX, cu_seq_lens) > 0).sum()


def sequence_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor, num_sequences_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Each sequence's mean token loss, summed over the batch's sequences, over the global sequence count.

    Equals ``mean over examples of (mean over that example's predicted tokens)`` computed on the
    examples unpacked, when ``num_sequences_in_batch`` is :func:`num_sequences` summed over the
    global batch. A sequence with no predicted token (all -100) counts for nothing.

    Args:
        logits: (1, T, V).
        labels: (1, T) int64, unshifted (the collator's).
        cu_seq_lens: (S + 1,) int32, the collator's ``cu_seq_lens_q``.
        num_sequences_in_batch: sequences in the global batch; None: this batch's own.

    Returns:
        A float32 scalar.
    """
    predicted = _shifted(labels) != IGNORE_INDEX
    counts = _per_sequence(predicted, cu_seq_lens)  # (S,)
    sums = _per_sequence(token_losses(logits, labels), cu_seq_lens)
    total = (counts > 0).sum() if num_sequences_in_batch is None else num_sequences_in_batch
    return (sums / counts.clamp(min=1)).sum() / total


def _per_sequence(values: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """(T,) values -> (S,) their sums over each sequence of ``cu_seq_lens`` (S + 1,)."""
    cu = cu_seq_lens.to(device=values.device, dtype=torch.int64)
    if int(cu[-1]) != values.numel():
        raise ValueError(f"cu_seq_lens ends at {int(cu[-1])} but the batch has {values.numel()} tokens")
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=values.device), cu.diff())
    dtype = torch.float32 if values.is_floating_point() else torch.int64
    return torch.zeros(len(cu) - 1, dtype=dtype, device=values.device).index_add_(0, seq, values.to(dtype))
