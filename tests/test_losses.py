"""prepack.losses: token-mean and sequence-mean over packed batches equal their unpacked definitions.

The oracle is each example run alone through the plain model, its losses combined by the unpacked
definition; gradients agree within 1e-6 relative (norm of the difference over the norm, per parameter).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

import prepack
from prepack import DataCollatorForPackedRows, pack_dataset
from prepack.losses import num_predicted_tokens, num_sequences, sequence_mean_loss, token_mean_loss

from .models import build

REL = 1e-6
LENGTHS = [7, 3, 12, 5, 9, 2, 6, 11]


def examples(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, n).tolist() for n in lengths]


def alone_losses(model, seq):
    """(n - 1,) the plain model's next-token losses on one example alone."""
    logits = model(torch.tensor([seq])).logits[0, :-1]
    return F.cross_entropy(logits.float(), torch.tensor(seq[1:]), reduction="none")


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for name, g in got.items():
        rel = float((g - want[name]).norm() / want[name].norm().clamp(min=1e-30))
        assert rel <= REL, f"{name}: relative gradient gap {rel:.2e}"


def model_pair():
    """The same tiny llama twice: the plain one (the oracle) and one on prepack's attention (packed)."""
    plain, packed = build("llama").train(), build("llama").train()
    packed.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    return plain, packed


def micro_batches(seqs, capacity=16, per_step=2):
    """Packed rows of seqs, collated ``per_step`` rows at a time: the micro-steps of one optimizer step."""
    rows = list(pack_dataset({"input_ids": seqs}, capacity))
    return [DataCollatorForPackedRows()(rows[i : i + per_step]) for i in range(0, len(rows), per_step)]


def test_token_mean_over_gradient_accumulation_equals_the_unpacked_token_mean():
    seqs = examples()
    plain, packed = model_pair()
    losses = [alone_losses(plain, s) for s in seqs]
    want_loss = torch.cat(losses).mean()
    want_loss.backward()
    want = grads(plain)

    batches = micro_batches(seqs)
    assert len(batches) > 1
    total = sum(num_predicted_tokens(b["labels"]) for b in batches)  # Trainer's num_items_in_batch
    loss = 0.0
    for b in batches:
        labels = b.pop("labels")
        step = token_mean_loss(packed(**b).logits, labels, total)
        step.backward()
        loss += step.detach()
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-6, atol=0)
    assert_grads_close(grads(packed), want)


def test_the_models_own_loss_with_num_items_in_batch_is_the_token_mean():
    seqs = examples()
    _, packed = model_pair()
    b = micro_batches(seqs)[0]
    total = num_predicted_tokens(b["labels"]) * 3
    own = packed(**b, num_items_in_batch=total).loss
    labels = b.pop("labels")
    torch.testing.assert_close(own, token_mean_loss(packed(**b).logits, labels, total), rtol=1e-6, atol=0)


def test_sequence_mean_over_gradient_accumulation_equals_the_mean_of_each_examples_mean():
    seqs = examples()
    plain, packed = model_pair()
    want_loss = torch.stack([alone_losses(plain, s).mean() for s in seqs]).mean()
    want_loss.backward()
    want = grads(plain)

    batches = micro_batches(seqs)
    total = sum(num_sequences(b["labels"], b["cu_seq_lens_q"]) for b in batches)
    assert total == len(seqs)
    loss = 0.0
    for b in batches:
        labels = b.pop("labels")
        step = sequence_mean_loss(packed(**b).logits, labels, b["cu_seq_lens_q"], total)
        step.backward()
        loss += step.detach()
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-6, atol=0)
    assert_grads_close(grads(packed), want)


def test_packing_changes_the_sequence_mean_when_it_is_taken_over_tokens():
    # the two normalisations differ on examples of different lengths: the option is not a no-op
    seqs = examples()
    plain, _ = model_pair()
    with torch.no_grad():
        per_example = [alone_losses(plain, s) for s in seqs]
    token_mean = torch.cat(per_example).mean()
    sequence_mean = torch.stack([x.mean() for x in per_example]).mean()
    assert abs(float(token_mean - sequence_mean)) > 1e-4


def test_a_sequence_with_nothing_to_predict_counts_for_nothing_in_the_sequence_mean():
    labels = torch.tensor([[-100, 5, 6, -100, -100, -100, 7]])
    cu = torch.tensor([0, 3, 5, 7], dtype=torch.int32)  # the middle sequence trains on nothing
    assert int(num_sequences(labels, cu)) == 2
    logits = torch.randn(1, 7, 10)
    mean = sequence_mean_loss(logits, labels, cu)
    ce = F.cross_entropy(logits[0], F.pad(labels[0, 1:], (0, 1), value=-100), reduction="none")
    torch.testing.assert_close(mean, (ce[0:2].mean() + ce[5:6].mean()) / 2)


def test_cu_seq_lens_that_do_not_cover_the_batch_are_refused():
    with pytest.raises(ValueError, match="cu_seq_lens ends at 5 but the batch has 7 tokens"):
        sequence_mean_loss(torch.randn(1, 7, 10), torch.zeros(1, 7, dtype=torch.long), torch.tensor([0, 5]))


class RecordGradients(TrainerCallback):
    """The gradients the optimizer is about to apply (after every micro-step of the step)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def test_trainer_gradient_accumulation_on_packed_rows_takes_the_unpacked_token_mean_step(tmp_path):
    seqs = examples()
    plain, packed = model_pair()
    torch.cat([alone_losses(plain, s) for s in seqs]).mean().backward()
    want = grads(plain)

    rows = list(pack_dataset({"input_ids": seqs}, 16))
    args = TrainingArguments(
        str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=-(-len(rows) // 2),
        max_grad_norm=0.0, remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no",
    )
    record = RecordGradients(packed)
    trainer = Trainer(model=packed, args=args, train_dataset=rows, data_collator=DataCollatorForPackedRows(),
                      callbacks=[prepack.PackedTrainingCallback(), record])
    trainer.train()
    assert_grads_close(record.grads, want)
