"""Packed rows -> one padding-free training batch: the collator for ``Trainer`` and TRL's ``SFTTrainer``.

transformers' ``DataCollatorWithFlattening`` flattens a batch of *examples*
into one (1, T) sequence; its rows must not be packed already, or it would
merge the sequences inside each row into one. :class:`DataCollatorForPackedRows`
gives the same layout over *packed rows*: each row's sequence boundaries come
from its ``seq_lengths`` (the lean schema of :mod:`prepack.data`) or, failing
that, from the restarts of its ``position_ids`` (the full schema, after
``Trainer(remove_unused_columns=True)`` dropped ``seq_lengths``)::

    rows  [s0 s1 | s2]  [s3 s4 s5]         B packed rows, S sequences in all
    ->    input_ids / labels / position_ids  (1, T)   T = tokens in the B rows
          cu_seq_lens_q / cu_seq_lens_k      (S + 1,) int32
          max_length_q / max_length_k        int

The boundaries travel as ``cu_seq_lens_q/k`` keyword arguments, so a model in
``attn_implementation="prepack"`` (or ``"flash_attention_2"`` on a GPU) runs
exact varlen attention and no dense (T, T) mask is built. A torch batch also
carries ``use_cache=False``: transformers' own ``sdpa`` / ``eager`` read the
restarts of ``position_ids`` as sequence boundaries only when the forward has no
cache (``masking_utils._preprocess_mask_arguments``), and a causal LM makes a
``DynamicCache`` whenever ``use_cache`` is on (its config's default), in train
mode too; with one, the sequences of a row would attend to each other.

That holds only for models whose mask builder reads ``position_ids``: OPT, BioGPT
and XGLM (and every type ``docs/packed_training_models.md`` marks) mix packed
sequences on ``sdpa`` / ``eager`` anyway. The collator holds no model, so it
cannot tell: :func:`prepack.check_packed_training` (or
:class:`prepack.PackedTrainingCallback` in a ``Trainer``) refuses such a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .planner import layout
from .hf.registration import cu_seqlens_from_position_ids

IGNORE_INDEX = -100  # what transformers' cross-entropy skips
# Per-token masks TRL's SFT datasets carry: a token whose mask is 0 is not trained on (labels -100).
LOSS_MASKS: tuple[str, ...] = ("completion_mask", "assistant_masks")


@dataclass
class DataCollatorForPackedRows:
    """Collate packed rows into one flattened batch with the varlen attention kwargs.

    A ``data_collator`` for ``transformers.Trainer`` and TRL's ``SFTTrainer``, or a
    ``DataLoader`` ``collate_fn``. With the lean schema, keep ``seq_lengths``
    in the batch: ``SFTTrainer`` does; for ``Trainer`` pass
    ``TrainingArguments(remove_unused_columns=False)`` (or pack with
    ``schema="full"``, whose ``position_ids`` the Trainer keeps).

    Labels are the row's ``labels`` (else its ``input_ids``) with ``separator_id``
    at every sequence start, as ``DataCollatorWithFlattening`` makes them, and
    -100 on padding and wherever a ``completion_mask`` / ``assistant_masks``
    column is 0 (as TRL's collator does). Padding of a ``pad_id``-packed row
    (the tokens after ``sum(seq_lengths)``) becomes one sequence of its own, so
    it attends to nothing real.

    A ``"pt"`` batch carries ``use_cache=False``, so ``model(**batch)`` (what ``Trainer`` and
    ``SFTTrainer`` call) makes no cache and transformers' plain ``sdpa`` / ``eager`` attention keeps the
    sequences of a row apart through the ``position_ids`` restarts, in models whose mask reads them (not
    OPT, BioGPT or XGLM: check the model with :func:`prepack.check_packed_training`). A ``"np"`` batch carries no
    ``use_cache``: its values stay arrays (plus the ``max_length_q/k`` ints when asked), the form Ray
    Data's ``map_batches`` (which refuses a non-array value) and other numpy consumers take; whoever
    turns it into a model call passes ``use_cache=False`` too (or runs prepack's or flash-attn's varlen
    attention, which read ``cu_seq_lens_q/k``).

    Attributes:
        return_flash_attn_kwargs: return ``cu_seq_lens_q/k`` and ``max_length_q/k``.
        separator_id: the label of each sequence's first token.
        return_seq_idx: also return ``seq_idx`` (1, T) int32, each token's
            sequence number in the batch (Mamba-style kernels take it).
        return_tensors: ``"pt"`` or ``"np"``.
    """

    return_flash_attn_kwargs: bool = True
    separator_id: int = IGNORE_INDEX
    return_seq_idx: bool = False
    return_tensors: str = "pt"

    def __call__(self, features: Sequence[Mapping[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        """B packed rows -> one batch.

        Args:
            features: B rows, the b-th with ``input_ids`` (L_b,) and ``seq_lengths``
                (S_b,) or ``position_ids`` (L_b,); optionally ``labels`` (L_b,) and
                the loss masks above.

        Returns:
            ``input_ids``, ``labels``, ``position_ids``: (1, T) int64, T = sum(L_b);
            ``cu_seq_lens_q``, ``cu_seq_lens_k``: (S + 1,) int32; ``max_length_q``,
            ``max_length_k``: int, the longest sequence; ``seq_idx`` if asked; ``use_cache``: False
            (``"pt"`` only).
        """
        return_tensors = return_tensors or self.return_tensors
        if return_tensors not in ("pt", "np"):
            raise ValueError(f'return_tensors must be "pt" or "np", got {return_tensors!r}')
        if not features:
            raise ValueError("DataCollatorForPackedRows got no rows")
        with_labels = "labels" in features[0]
        ids, segments, pad, labels = [], [], [], []
        for b, row in enumerate(features):
            row_ids = _array(row, "input_ids", b)
            lengths, real = _row_segments(row, row_ids, b)
            ids.append(row_ids)
            segments.append(lengths)
            pad.append(np.arange(len(row_ids)) >= real)
            if ("labels" in row) != with_labels:
                raise ValueError(f"row {b} {'has no' if with_labels else 'has'} labels, unlike row 0")
            if with_labels:
                labels.append(_array(row, "labels", b))
                if len(labels[-1]) != len(row_ids):
                    raise ValueError(f"row {b} has {len(row_ids)} input_ids but {len(labels[-1])} labels")
        input_ids = np.concatenate(ids).astype(np.int64, copy=False)
        lengths = np.concatenate(segments)
        labels = np.concatenate(labels).astype(np.int64) if with_labels else input_ids.copy()
        cu = layout.cu_seqlens(lengths)
        # Labels are unshifted (the model shifts them): the separator on a sequence's first token stops
        # the previous sequence's last token from learning to predict it.
        labels[cu[:-1]] = self.separator_id
        labels[np.concatenate(pad)] = IGNORE_INDEX
        for name in LOSS_MASKS:
            if name in features[0]:
                mask = np.concatenate([_array(row, name, b) for b, row in enumerate(features)])
                labels[mask == 0] = IGNORE_INDEX
        batch: dict[str, Any] = {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": layout.positions(lengths)[None],
        }
        if self.return_flash_attn_kwargs:
            longest = int(lengths.max())
            batch |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        if self.return_seq_idx:
            batch["seq_idx"] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[None]
        if return_tensors == "pt":
            batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
            # A training step needs no cache, and with one transformers' sdpa/eager masks ignore the position_ids
            # restarts (they look for packed sequences only when cache is None): the sequences would mix silently.
            batch["use_cache"] = False
        return batch


def to_flash_kwargs(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor | int | bool]:
    """``DataCollatorForPackedRows()(rows)``: B packed rows -> one padding-free batch of torch tensors."""
    return DataCollatorForPackedRows()(rows)


def _row_segments(row: Mapping[str, Any], ids: np.ndarray, b: int) -> tuple[np.ndarray, int]:
    """Row b's sequence lengths (a trailing padding run as one more) and its real (non-padding) token count."""
    if not len(ids):
        raise ValueError(f"row {b} has no input_ids")
    if "seq_lengths" in row:
        lengths = _array(row, "seq_lengths", b).astype(np.int64)
        real = int(lengths.sum())
        if real > len(ids) or len(lengths) == 0 or lengths.min() < 1:
            raise ValueError(
                f"row {b} has seq_lengths {lengths.tolist()} (sum {real}) for {len(ids)} input_ids; "
                "they must be positive and sum to at most its length"
            )
        return (np.append(lengths, len(ids) - real) if real < len(ids) else lengths), real
    if "position_ids" in row:
        pos = _array(row, "position_ids", b)
        if len(pos) != len(ids):
            raise ValueError(f"row {b} has {len(ids)} input_ids but {len(pos)} position_ids")
        cu = cu_seqlens_from_position_ids(torch.from_numpy(pos.astype(np.int64))[None], 1, len(pos)).numpy()
        return np.diff(cu).astype(np.int64), len(ids)
    raise ValueError(
        f"row {b} has neither seq_lengths nor position_ids, so its sequence boundaries are unknown (columns: "
        f"{list(row)}); transformers.Trainer drops columns its model's forward does not take: pass "
        "TrainingArguments(remove_unused_columns=False), or pack with schema=\"full\""
    )


def _array(row: Mapping[str, Any], name: str, b: int) -> np.ndarray:
    value = row[name]
    if isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    arr = np.asarray(value)
    if arr.size == 0:
        arr = arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or arr.dtype.kind not in "biu":
        raise ValueError(f"row {b}: {name} must be a 1-D list of integers, got shape {arr.shape} dtype {arr.dtype}")
    return arr
