"""prepack.collate: packed rows -> padding-free batches for transformers.Trainer and TRL's SFTTrainer."""

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import prepack
from prepack.collate import DataCollatorForPackedRows, to_flash_kwargs
from prepack.data.fronts import pack_dataset

from .models import build


def token_lists(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, n).tolist() for n in lengths]


def packed_in_order(seqs, capacity, **kwargs):
    """Packed rows of ``seqs`` and the examples in packed order (DataCollatorWithFlattening's input)."""
    rows = list(pack_dataset(datasets.Dataset.from_dict(seqs), capacity, schema="full", **kwargs))
    order = [i for r in rows for i in r["example_ids"]]
    examples = [{k: v[i] for k, v in seqs.items()} for i in order]
    return rows, examples


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 16), min_size=1, max_size=12), st.integers(16, 40), st.booleans())
def test_packed_rows_collate_like_data_collator_with_flattening_over_their_examples(lengths, capacity, with_labels):
    seqs = {"input_ids": token_lists(lengths)}
    if with_labels:
        seqs["labels"] = [[-100] * (len(s) // 2) + s[len(s) // 2 :] for s in seqs["input_ids"]]
    rows, examples = packed_in_order(seqs, capacity)
    lean = [{k: r[k] for k in ("input_ids", "seq_lengths", *(("labels",) if with_labels else ()))} for r in rows]
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(examples)
    for batch in (DataCollatorForPackedRows(return_seq_idx=True)(lean), to_flash_kwargs(rows)):
        for key in ("input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k"):
            assert torch.equal(batch[key].to(theirs[key].dtype), theirs[key]), key
        assert batch["max_length_q"] == batch["max_length_k"] == theirs["max_length_q"]
    assert torch.equal(DataCollatorForPackedRows(return_seq_idx=True)(lean)["seq_idx"], theirs["seq_idx"])


def test_full_rows_without_seq_lengths_split_at_position_restarts():
    rows, _ = packed_in_order({"input_ids": token_lists([3, 5, 2, 7])}, 10)
    kept = [{k: r[k] for k in ("input_ids", "position_ids", "labels")} for r in rows]  # what Trainer keeps
    a, b = DataCollatorForPackedRows()(kept), DataCollatorForPackedRows()(rows)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"))


def test_labels_are_minus_100_at_every_sequence_start_and_on_padding():
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]}), 8, pad_id=0)
    batch = DataCollatorForPackedRows()(list(packed))
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    # the padding is one sequence of its own, so it attends to nothing real
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_completion_mask_zeros_are_not_trained_on():
    rows = [{"input_ids": [5, 6, 7, 8], "seq_lengths": [4], "completion_mask": [0, 0, 1, 1]}]
    assert DataCollatorForPackedRows()(rows)["labels"].tolist() == [[-100, -100, 7, 8]]


def test_rows_without_boundaries_say_how_to_keep_them():
    with pytest.raises(ValueError, match=r"row 0 has neither seq_lengths nor position_ids.*remove_unused_columns=False"):
        DataCollatorForPackedRows()([{"input_ids": [5, 6, 7]}])


def test_seq_lengths_longer_than_the_row_are_refused():
    with pytest.raises(ValueError, match=r"row 1 has seq_lengths \[2, 3\] \(sum 5\) for 4 input_ids"):
        DataCollatorForPackedRows()([{"input_ids": [1], "seq_lengths": [1]}, {"input_ids": [1, 2, 3, 4], "seq_lengths": [2, 3]}])


def test_data_collator_with_flattening_would_merge_the_sequences_of_a_packed_row():
    packed = list(pack_dataset(datasets.Dataset.from_dict({"input_ids": token_lists([3, 5, 2])}), 16))
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": r["input_ids"]} for r in packed])
    assert theirs["cu_seq_lens_q"].tolist() == [0, 10]  # one sequence: its tokens would attend across examples
    assert DataCollatorForPackedRows()(packed)["cu_seq_lens_q"].tolist() == [0, 5, 8, 10]


def test_numpy_tensors_on_request():
    batch = DataCollatorForPackedRows(return_tensors="np")([{"input_ids": [5, 6, 7], "seq_lengths": [2, 1]}])
    assert isinstance(batch["input_ids"], np.ndarray) and batch["cu_seq_lens_q"].dtype == np.int32


# --- training ------------------------------------------------------------------------------------


def summed_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


def test_packed_training_step_gives_the_loss_and_gradients_of_each_sequence_alone():
    seqs = token_lists([7, 3, 12, 5, 9])
    model = build("llama").train()
    model.config.attention_dropout = 0.0
    alone = sum(summed_loss(model(torch.tensor([s])).logits[0], torch.tensor(s)) for s in seqs)
    alone.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    batch = to_flash_kwargs(list(pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), 64)))
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    labels = batch.pop("labels")
    logits = model(**batch).logits[0]
    loss = summed_loss(logits, labels[0])
    loss.backward()
    torch.testing.assert_close(loss, alone, atol=1e-4, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_naive_packing_without_restarts_or_masks_gives_a_different_loss():
    seqs = token_lists([7, 3, 12, 5, 9])
    model = build("llama").eval()
    with torch.no_grad():
        alone = sum(summed_loss(model(torch.tensor([s])).logits[0], torch.tensor(s)) for s in seqs)
        batch = to_flash_kwargs(list(pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), 64)))
        naive = summed_loss(model(batch["input_ids"]).logits[0], batch["labels"][0])  # plain causal, positions 0..T-1
    assert abs(naive.item() - alone.item()) > 1e-2


def plain_model_in_training(attn: str):
    """The tiny llama on transformers' own attention, in train mode with its config's default use_cache=True."""
    model = build("llama").train()
    model.set_attn_implementation(attn)
    assert model.config.use_cache and model.config.attention_dropout == 0.0
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def packed_batch(seqs):
    return DataCollatorForPackedRows()(list(pack_dataset(datasets.Dataset.from_dict({"input_ids": seqs}), 64)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_on_plain_sdpa_or_eager_give_the_padded_batch_loss_and_gradients(attn):
    seqs = token_lists([7, 3, 12, 5, 9])
    model = plain_model_in_training(attn)
    want_loss, want_grads = loss_and_grads(model, pad_examples([{"input_ids": s} for s in seqs]))
    batch = packed_batch(seqs)
    assert batch["use_cache"] is False  # the model makes no cache, so its mask splits at the position_ids restarts
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_on_plain_sdpa_would_mix_their_sequences_if_the_model_made_a_cache():
    seqs = token_lists([7, 3, 12, 5, 9])
    model = plain_model_in_training("sdpa")
    with torch.no_grad():
        padded = model(**pad_examples([{"input_ids": s} for s in seqs])).loss
        with_cache = model(**{**packed_batch(seqs), "use_cache": True}).loss
    assert abs(with_cache.item() - padded.item()) > 1e-2


def test_numpy_batches_hold_arrays_only():
    batch = DataCollatorForPackedRows(return_flash_attn_kwargs=False, return_tensors="np")(
        [{"input_ids": [5, 6, 7], "seq_lengths": [2, 1]}]
    )
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]
    assert all(isinstance(v, np.ndarray) for v in batch.values())


SFT_SEQS = token_lists([7, 3, 12, 5, 9, 4, 11, 6, 2, 8])


def pad_examples(features):
    """The unpacked baseline: examples right-padded into one (B, L) batch, padding masked out of attention and loss."""
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def first_step_loss(tmp_path, model, dataset, collator, batch_size, **args) -> float:
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=batch_size, logging_steps=1,
        learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True, **args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer.state.log_history[0]["loss"]


def test_trainer_first_step_loss_on_packed_rows_matches_the_unpacked_examples(tmp_path):
    examples = datasets.Dataset.from_dict({"input_ids": SFT_SEQS})
    packed = pack_dataset(examples, 24)
    assert len(packed) < len(examples)
    # every row (every example) in the first step, so the shuffle cannot change what it sees
    unpacked = first_step_loss(tmp_path, build("llama"), examples, pad_examples, len(examples))
    model = build("llama")
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    loss = first_step_loss(tmp_path, model, packed, DataCollatorForPackedRows(), len(packed))
    assert loss == pytest.approx(unpacked, rel=1e-5)


def test_trainer_with_use_cache_on_plain_sdpa_gives_the_unpacked_loss_on_packed_rows(tmp_path):
    # TrainingArguments(use_cache=True) (PEFT methods ask for it) writes use_cache=True into the model's config;
    # the batch's use_cache=False still keeps the forward cache-free, so sdpa splits the rows at their restarts
    examples = datasets.Dataset.from_dict({"input_ids": SFT_SEQS})
    packed = pack_dataset(examples, 24)
    unpacked = first_step_loss(tmp_path, build("llama"), examples, pad_examples, len(examples), use_cache=True)
    model = build("llama")
    assert model.config._attn_implementation == "sdpa"
    loss = first_step_loss(tmp_path, model, packed, DataCollatorForPackedRows(), len(packed), use_cache=True)
    assert model.config.use_cache
    assert loss == pytest.approx(unpacked, rel=1e-5)


def test_a_trainer_step_on_packed_rows_builds_no_dense_mask(tmp_path, monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense mask was built for a padding-free batch")

    for name in ("sdpa", "eager"):
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, no_dense_mask)
    model = build("llama")
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": SFT_SEQS}), 24)
    assert np.isfinite(first_step_loss(tmp_path, model, packed, DataCollatorForPackedRows(), 2))


def test_sft_trainer_first_step_loss_on_packed_rows_matches_the_unpacked_examples(tmp_path):
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(1, 128)} | {"<pad>": 0}  # SFTTrainer wants a tokenizer; the rows are tokenized already
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="<pad>"
    )
    examples = datasets.Dataset.from_dict({"input_ids": SFT_SEQS})
    packed = pack_dataset(examples, 24)
    unpacked = first_step_loss(tmp_path, build("llama"), examples, pad_examples, len(examples))
    model = build("llama")
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    config = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(packed), logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        packing=False, max_length=None, bf16=False,  # packed already: no repacking, no truncation; fp32 like the baseline
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=packed, data_collator=DataCollatorForPackedRows(), processing_class=tokenizer
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(unpacked, rel=1e-5)
