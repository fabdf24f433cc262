"""A batch sampler that hands packed rows to data-parallel ranks: equal batch counts, balanced cost, resumable.

Every rank builds the same :class:`PackedRowSampler` over the same packed rows (from
:func:`prepack.pack_dataset`); each computes the same :func:`prepack.planner.balance.balance_rows` schedule
from ``seed + epoch`` (no communication) and yields only its own micro-batches, as lists of row
indices, for a ``DataLoader(rows, batch_sampler=sampler, collate_fn=DataCollatorForPackedRows())``.
Over an epoch every row is used exactly once across all ranks, and every rank gets ``len(sampler)``
micro-batches, so no rank waits at an epoch's end for a batch that never comes.

With ``transformers.Trainer``: it is a ``transformers.trainer_pt_utils.BatchRebalanceSampler``
(transformers' own rank-aware batch sampler), so ``Trainer`` passes it to its ``DataLoader`` as the
``batch_sampler`` and keeps accelerate from sharding it a second time; return it from
``Trainer._get_train_sampler`` (see :meth:`PackedRowSampler.for_trainer` and
``examples/packed_sft_multirank.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from transformers.trainer_pt_utils import BatchRebalanceSampler

from ..planner.balance import Schedule, balance_rows, row_costs


class PackedRowSampler(BatchRebalanceSampler):
    """This rank's micro-batches of packed rows (lists of row indices), balanced across ranks x micro-steps.

    Args:
        rows: the packed rows: a ``datasets.Dataset`` or a list of dicts with a ``seq_lengths`` column
            ((S_r,) per row), or the list of those lengths.
        world_size, rank: the data-parallel group (default: ``torch.distributed``'s when initialized, else 1, 0).
        micro_steps: gradient-accumulation steps M per optimizer step.
        rows_per_micro_batch: rows B in a micro-batch (see :func:`prepack.planner.balance.balance_rows`).
        attention: None: cost = tokens; ``a``: cost ``a * L + L**2`` per sequence
            (:func:`prepack.planner.balance.attention_coefficient` gives ``a`` for a hidden size).
        seed: the shuffle's seed; :meth:`set_epoch` changes it per epoch.

    Raises:
        ValueError: a row without sequences, a rank outside the group, or too few rows for W x M micro-batches.
    """

    def __init__(
        self,
        rows: Any,
        *,
        world_size: int | None = None,
        rank: int | None = None,
        micro_steps: int = 1,
        rows_per_micro_batch: int = 1,
        attention: float | None = None,
        seed: int = 0,
    ):
        # transformers' __init__ is not called: this class keeps its own state (BatchRebalanceSampler only
        # tells Trainer to pass it as a batch sampler).
        if world_size is None or rank is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            world_size = (dist.get_world_size() if ready else 1) if world_size is None else world_size
            rank = (dist.get_rank() if ready else 0) if rank is None else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")
        lengths, counts = _row_lengths(rows)
        self.costs = row_costs(lengths, counts, attention)
        self.world_size, self.rank, self.micro_steps = int(world_size), int(rank), int(micro_steps)
        self.rows_per_micro_batch, self.seed = int(rows_per_micro_batch), int(seed)
        self.epoch = 0
        self._yielded = 0  # micro-batches of this epoch already handed out (state_dict)
        self._len = self._schedule().steps * self.micro_steps  # also checks the sizes

    @classmethod
    def for_trainer(cls, args, rows: Any, **kwargs) -> PackedRowSampler:
        """The sampler a ``Trainer`` with these ``TrainingArguments`` needs: its world, rank, accumulation,
        ``per_device_train_batch_size`` rows per micro-batch and seed."""
        return cls(
            rows, world_size=max(1, args.world_size), rank=args.process_index, micro_steps=args.gradient_accumulation_steps,
            rows_per_micro_batch=args.per_device_train_batch_size, seed=args.seed, **kwargs,
        )

    def _schedule(self) -> Schedule:
        return balance_rows(
            self.costs, self.world_size, self.micro_steps, self.rows_per_micro_batch, seed=self.seed, epoch=self.epoch
        )

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (its own shuffle); a DataLoader calls it through ``Trainer`` each epoch."""
        if epoch != self.epoch:
            self.epoch, self._yielded = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._schedule().micro_batches(self.rank)
        for b in batches[self._yielded :]:
            self._yielded += 1
            yield b.tolist()
        self._yielded = 0  # the epoch is done: iterating again replays it whole

    def __len__(self) -> int:
        return self._len

    def state_dict(self) -> dict[str, int]:
        """Where this rank is: the epoch and the micro-batches of it handed out (torchdata's ``StatefulDataLoader``
        protocol). Loading it into a sampler over the same rows resumes with the next micro-batch."""
        return {"epoch": self.epoch, "yielded": self._yielded, "seed": self.seed, "world_size": self.world_size,
                "rank": self.rank, "rows": len(self.costs)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from :meth:`state_dict`; refuses a state from another seed, world, rank or set of rows."""
        for key in ("seed", "world_size", "rank", "rows"):
            mine = {"seed": self.seed, "world_size": self.world_size, "rank": self.rank, "rows": len(self.costs)}[key]
            if state[key] != mine:
                raise ValueError(f"the sampler state has {key}={state[key]} but this sampler has {key}={mine}")
        if not 0 <= state["yielded"] <= self._len:
            raise ValueError(f"the sampler state has yielded={state['yielded']}, outside 0..{self._len}")
        self.epoch, self._yielded = int(state["epoch"]), int(state["yielded"])


def _row_lengths(rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows -> (every row's sequence lengths back to back (S,), sequences per row (R,))."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        datasets = None
    if datasets is not None and isinstance(rows, datasets.Dataset):
        import pyarrow.compute as pc

        if "seq_lengths" not in rows.column_names:
            raise ValueError(f"the rows have no seq_lengths column (columns: {rows.column_names}); pack them with prepack.pack_dataset")
        col = rows.data.column("seq_lengths")
        lengths = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        counts = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    else:
        per_row = [r["seq_lengths"] if isinstance(r, Mapping) else r for r in rows]
        counts = np.array([len(r) for r in per_row], np.int64)
        lengths = np.concatenate([np.asarray(r, np.int64) for r in per_row]) if per_row else np.zeros(0, np.int64)
    counts = np.asarray(counts, np.int64)
    if len(counts) and counts.min() < 1:
        raise ValueError(f"row {int(np.argmin(counts))} has no sequences (empty seq_lengths)")
    return np.asarray(lengths, np.int64), counts

