"""prepack.collate_vision: vision-language examples -> one padding-free training batch with the model's own positions.

The oracle is the plain model (sdpa) on the processor's padded batch of the same examples: transformers
builds its mRoPE positions with ``get_rope_index`` over the padded batch and masks the padding.
"""

import copy

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import prepack
from prepack.collate_vision import DataCollatorForPackedVisionRows

from . import models
from .vision_models import FAMILIES, image, model_and_processor


def chats(placeholder: str):
    """(texts, images): an image and text, text alone, two images of different sizes, an image first."""
    texts = [
        f"the quick {placeholder} brown fox jumps",
        "hello world how are you today",
        f"a user asks {placeholder} a question {placeholder} and the assistant answers it",
        f"{placeholder} packing prompts removes the padding",
    ]
    images = [[image(84, 56, 1)], [], [image(56, 84, 2), image(56, 56, 3)], [image(84, 84, 4)]]  # Qwen2-VL: 6, 6 + 4, 9 tokens
    return texts, images


def examples_of(processor, texts, images) -> list[dict]:
    """Each chat through the processor alone: what a dataset's map or a collator gets per example."""
    return [dict(processor(text=[t], images=i or None, return_tensors="pt")) for t, i in zip(texts, images)]


def padded_batch(processor, texts, images) -> dict:
    """The unpacked baseline: the processor's padded batch, padding out of the loss."""
    batch = dict(processor(text=texts, images=[i for imgs in images for i in imgs], padding=True, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def setup(family: str):
    model, processor = model_and_processor(family)
    model.train()  # no dropout in these configs: train mode changes nothing but what a Trainer would see
    texts, images = chats(FAMILIES[family])
    packed = copy.deepcopy(model)
    packed.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    return model, packed, processor, texts, images


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava"])
def test_packed_vlm_step_gives_the_loss_and_gradients_of_the_padded_batch(family):
    model, packed, processor, texts, images = setup(family)
    want_loss, want_grads = loss_and_grads(model, padded_batch(processor, texts, images))
    batch = DataCollatorForPackedVisionRows(packed)(examples_of(processor, texts, images))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    loss, grads = loss_and_grads(packed, batch)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_mrope_positions_restart_per_example_as_transformers_builds_them_for_the_padded_batch():
    model, packed, processor, texts, images = setup("qwen2_5_vl")
    padded = padded_batch(processor, texts, images)
    want, _ = model.model.get_rope_index(
        padded["input_ids"], mm_token_type_ids=padded["mm_token_type_ids"], image_grid_thw=padded["image_grid_thw"],
        attention_mask=padded["attention_mask"],
    )  # (3, B, L), each row's real tokens positioned as that example alone
    position_ids = DataCollatorForPackedVisionRows(packed)(examples_of(processor, texts, images))["position_ids"]
    lengths = padded["attention_mask"].sum(-1).tolist()
    segments = torch.split(position_ids[:, 0], lengths, dim=-1)
    for b, (segment, n) in enumerate(zip(segments, lengths)):
        assert torch.equal(segment[0], torch.arange(n)), b  # the text row restarts: the sequence boundaries
        assert torch.equal(segment[1:], want[:, b, :n]), b
    assert any(not torch.equal(s[1], s[0]) for s in segments)  # images really move the t/h/w positions


@pytest.mark.parametrize("rows", ["text row only (1-D restarting)", "mRoPE rows without the text row"])
def test_packing_without_the_models_mrope_positions_gives_a_different_loss(rows):
    model, packed, processor, texts, images = setup("qwen2_5_vl")
    with torch.no_grad():
        want = model(**padded_batch(processor, texts, images)).loss
        batch = DataCollatorForPackedVisionRows(packed)(examples_of(processor, texts, images))
        batch["position_ids"] = batch["position_ids"][0] if rows.startswith("text") else batch["position_ids"][1:]
        loss = packed(**batch).loss
    assert abs(loss.item() - want.item()) > 1e-3


def test_an_unpacked_batch_with_mrope_position_ids_runs_each_row_alone():
    """transformers PR #47342: 3-D mRoPE position ids must not make an unpacked batch look packed."""
    model, packed, processor, _, _ = setup("qwen2_5_vl")
    model.eval(), packed.eval()
    placeholder = FAMILIES["qwen2_5_vl"]
    texts = [f"hello {placeholder} world", f"the {placeholder} quick"]  # equal lengths: no padding, no mask
    images = [image(84, 56, 5), image(56, 84, 6)]
    batch = dict(processor(text=texts, images=images, return_tensors="pt"))
    assert bool(batch.pop("attention_mask").all())
    mrope, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    text = torch.arange(batch["input_ids"].shape[1]).expand(1, 2, -1)
    with torch.no_grad():
        alone = [
            model(**processor(text=[t], images=[i], return_tensors="pt")).logits[0] for t, i in zip(texts, images)
        ]
        for position_ids in (mrope, torch.cat([text, mrope])):  # (3, B, L) and (4, B, L)
            logits = packed(**batch, position_ids=position_ids).logits
            for b in range(2):
                torch.testing.assert_close(logits[b], alone[b], atol=1e-4, rtol=1e-4)


def test_trainer_first_step_loss_on_packed_vlm_examples_matches_the_padded_batch(tmp_path):
    model, packed, processor, texts, images = setup("qwen2_5_vl")
    with torch.no_grad():
        unpacked = model(**padded_batch(processor, texts, images)).loss.item()  # what a Trainer logs for its first step
    rows = [{"text": t, "images": i} for t, i in zip(texts, images)]
    pack = DataCollatorForPackedVisionRows(packed)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(rows), logging_steps=1,
        learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True,
    )
    collate = lambda rs: pack(examples_of(processor, [r["text"] for r in rs], [r["images"] for r in rs]))  # noqa: E731
    trainer = Trainer(model=packed, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(unpacked, rel=1e-5)


def test_dataset_rows_of_lists_collate_like_the_processors_tensors():
    _, model, processor, texts, images = setup("qwen2_5_vl")
    examples = examples_of(processor, texts, images)
    as_lists = [{k: v[0].tolist() if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v.tolist() for k, v in e.items()}
                for e in examples]
    pack = DataCollatorForPackedVisionRows(model)
    a, b = pack(examples), pack(as_lists)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_collator_with_flattening_drops_the_images_and_gives_one_position_row():
    """The peer: it flattens text examples only (docs/vision_training.md's comparison)."""
    _, _, processor, texts, images = setup("qwen2_5_vl")
    examples = [{k: v[0].tolist() if k == "input_ids" else v for k, v in e.items()} for e in examples_of(processor, texts, images)]
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)
    assert "pixel_values" not in theirs and "image_grid_thw" not in theirs
    assert theirs["position_ids"].shape == theirs["input_ids"].shape  # (1, T): no height/width positions


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "image_sizes", "token_type_ids"])
def test_a_key_the_collator_does_not_handle_is_refused_naming_the_example(key):
    _, model, processor, texts, images = setup("qwen2_5_vl")
    examples = examples_of(processor, texts, images)
    examples[2][key] = torch.ones(1, 3)
    with pytest.raises(ValueError, match=rf"example 2 has \['{key}'\], which DataCollatorForPackedVisionRows does not handle"):
        DataCollatorForPackedVisionRows(model)(examples)


def test_video_tokens_are_refused_naming_the_example():
    _, model, processor, texts, images = setup("qwen2_5_vl")
    examples = examples_of(processor, texts, images)
    examples[1]["input_ids"] = examples[1]["input_ids"].clone()
    examples[1]["input_ids"][0, 2] = model.config.video_token_id
    with pytest.raises(ValueError, match=r"example 1 has video tokens \(id \d+\); videos are not handled"):
        DataCollatorForPackedVisionRows(model)(examples)


def test_image_grid_thw_is_refused_by_llava():
    _, model, processor, texts, images = setup("llava")
    examples = examples_of(processor, texts, images)
    examples[0]["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match=r"example 0 has \['image_grid_thw'\].*for llava"):
        DataCollatorForPackedVisionRows(model)(examples)


def test_a_model_the_collator_was_not_checked_on_is_refused():
    with pytest.raises(ValueError, match=r"does not support LlamaForCausalLM \(model_type 'llama'\); supported: qwen2_vl, qwen2_5_vl, qwen3_vl, llava"):
        DataCollatorForPackedVisionRows(models.build("llama"))


def test_a_model_without_prepack_attention_is_refused_because_its_own_sdpa_mixes_the_examples():
    model, packed, processor, texts, images = setup("llava")
    examples = examples_of(processor, texts, images)
    with pytest.raises(ValueError, match=r"LlavaForConditionalGeneration runs 'sdpa' attention.*prepack.enable\(model\)"):
        DataCollatorForPackedVisionRows(model)(examples)
    with torch.no_grad():  # why: with use_cache on (the default) transformers' sdpa ignores the restarting positions
        want = model(**padded_batch(processor, texts, images)).loss
        own = model(**DataCollatorForPackedVisionRows(packed)(examples)).loss
    assert abs(own.item() - want.item()) > 1e-3


def test_images_that_do_not_match_their_example_s_image_tokens_are_refused():
    _, model, processor, texts, images = setup("qwen2_5_vl")
    examples = examples_of(processor, texts, images)
    # swap the grids of example 2's two images: the totals still match, the runs do not
    examples[2]["image_grid_thw"] = examples[2]["image_grid_thw"].flip(0)
    with pytest.raises(ValueError, match=r"example 2 has image-token runs of \[6, 4\] tokens but its images need \[4, 6\]"):
        DataCollatorForPackedVisionRows(model)(examples)
    examples = examples_of(processor, texts, images)
    del examples[0]["pixel_values"], examples[0]["image_grid_thw"]
    with pytest.raises(ValueError, match=r"example 0 has 6 image tokens but no pixel_values"):
        DataCollatorForPackedVisionRows(model)(examples)


def test_a_padded_example_is_refused():
    _, model, processor, texts, images = setup("llava")
    examples = examples_of(processor, texts, images)
    examples[1]["attention_mask"] = examples[1]["attention_mask"].clone()
    examples[1]["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="example 1 is padded"):
        DataCollatorForPackedVisionRows(model)(examples)


def test_the_runs_of_a_mask_are_found_in_order():
    from prepack.collate_vision import _runs

    assert _runs(np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)) == [2, 1, 3]
    assert _runs(np.zeros(3, dtype=bool)) == []
