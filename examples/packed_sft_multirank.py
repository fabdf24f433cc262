"""Multi-rank packed SFT with resume: pack once, balance rows across ranks, train with Trainer, resume a checkpoint.

Copy it for your own run: swap the tiny random-weight Llama for ``AutoModelForCausalLM.from_pretrained(...)``
and the random token lists for your tokenized dataset. On CPU (gloo)::

    HF_HUB_OFFLINE=1 torchrun --nproc_per_node 2 examples/packed_sft_multirank.py --output-dir out --max-steps 4
    HF_HUB_OFFLINE=1 torchrun --nproc_per_node 2 examples/packed_sft_multirank.py --output-dir out --max-steps 8 --resume

What each piece does:

* ``pack_dataset`` packs the examples into rows of ``--capacity`` tokens once, on every rank (same rows);
* ``PackedRowSampler`` gives every rank the same number of micro-batches per epoch, each row to one rank
  once, the cost of each step balanced across ranks x gradient-accumulation steps;
* ``DataCollatorForPackedRows`` makes each micro-batch one padding-free sequence, and the model runs
  prepack's attention, which keeps the packed sequences apart; ``PackedTrainingCallback`` refuses a model
  that would not;
* ``Trainer`` passes the global count of predicted tokens (``num_items_in_batch``, gathered over ranks) to
  the model, so the loss is the unpacked token-mean;
* ``--resume`` continues from the last checkpoint: the sampler's schedule depends only on seed and epoch,
  so the resumed run sees the micro-batches the uninterrupted run would have.

Each rank prints ``step <n> loss <x>`` lines (rank 0) and the micro-batches it trained on, for the tests.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import prepack
from prepack import DataCollatorForPackedRows, PackedRowSampler, PackedTrainingCallback, pack_dataset


class PackedTrainer(Trainer):
    """A Trainer whose training batches come from :class:`prepack.PackedRowSampler`."""

    def _get_train_sampler(self, train_dataset=None):
        return PackedRowSampler.for_trainer(self.args, train_dataset if train_dataset is not None else self.train_dataset)


class PrintLoss(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            print(json.dumps({"step": state.global_step, "loss": logs["loss"]}), flush=True)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def examples(n: int, seed: int = 0) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    return {"input_ids": [rng.integers(3, 128, int(k)).tolist() for k in rng.integers(4, 60, n)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--capacity", type=int, default=128)
    p.add_argument("--rows-per-micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = p.parse_args(argv)

    rows = pack_dataset(examples(args.examples), args.capacity)
    model = tiny_llama()
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    training = TrainingArguments(
        args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.rows_per_micro_batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=1e-3, logging_steps=1, save_steps=args.save_steps,
        remove_unused_columns=False,  # keep seq_lengths for the collator
        report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = PackedTrainer(model=model, args=training, train_dataset=rows, data_collator=DataCollatorForPackedRows(),
                            callbacks=[PackedTrainingCallback(), PrintLoss()])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
