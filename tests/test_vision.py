"""Prompts with images: each request's result equals its own processor output run alone through the model.

Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL (mRoPE, vision towers packed by ``cu_seqlens``,
Qwen3-VL's deepstack features) and a LLaVA (CLIP tower, plain positions), with their own processor
classes; chats hold 0, 1 or 2 images of different sizes.
"""

import functools

import pytest
import torch
from transformers import DynamicCache

import prepack
from prepack.hf.support import UnsupportedModelError

from .models import alone_last_logits, cache_kwargs, left_pad, prompts
from .vision_models import alone, chats, gemma3_model, llava_model, llava_processor, qwen_model, qwen_processor

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@functools.lru_cache(maxsize=None)
def qwen(model_type: str):
    return qwen_model(model_type), qwen_processor(model_type)


def alone_logits(model, outs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**o).logits[0] for o in outs]


@pytest.mark.parametrize("model_type", QWEN)
def test_prefill_of_chats_with_images_matches_each_chat_alone(model_type):
    model, processor = qwen(model_type)
    conversations = chats(5)
    outs = [alone(processor, c) for c in conversations]
    result = prepack.prefill(model, conversations, processor=processor)
    want = torch.stack([lo[-1] for lo in alone_logits(model, outs)])
    assert (result.logits - want).abs().max() <= 1e-4
    for i, o in enumerate(outs):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(**o, **cache_kwargs(model, cache))
        for mine, theirs in zip(result.dynamic_caches[i].layers, cache.layers, strict=True):
            assert (mine.keys - theirs.keys).abs().max() <= 1e-4
            assert (mine.values - theirs.values).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_processor_batch_gives_each_rows_own_logits(side):
    model, processor = qwen("qwen2_vl")
    conversations = chats(5)
    processor.tokenizer.padding_side = side
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    images = [x["image"] for c in conversations for m in c for x in m["content"] if x["type"] == "image"]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0 and "mm_token_type_ids" in batch  # really padded, all keys in
    want = torch.stack([lo[-1] for lo in alone_logits(model, [alone(processor, c) for c in conversations])])
    assert (prepack.prefill(model, batch).logits - want).abs().max() <= 1e-4


def test_forward_at_every_position_with_images_split_over_forwards_matches_each_alone():
    model, processor = qwen("qwen2_5_vl")
    conversations = chats(5)
    got = prepack.forward_at(model, conversations, "all", processor=processor, token_budget=40)  # several forwards
    for mine, theirs in zip(got, alone_logits(model, [alone(processor, c) for c in conversations]), strict=True):
        assert (mine - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", QWEN)
def test_generate_with_images_gives_model_generate_tokens_of_each_chat_alone(model_type):
    model, processor = qwen(model_type)
    conversations = chats(5)
    got = prepack.generate(model, conversations, processor=processor, max_new_tokens=8)
    for mine, c in zip(got, conversations, strict=True):
        o = alone(processor, c)
        with torch.no_grad():
            want = model.generate(**o, max_new_tokens=8, do_sample=False)[0, o["input_ids"].shape[1]:]
        assert mine.tokens.tolist() == want.tolist()


def test_chats_with_images_that_share_a_long_system_prompt_run_whole_and_match_each_alone():
    # a shared text prefix of well over 32 tokens: text requests would share it; requests with images run whole
    model, processor = qwen("qwen2_5_vl")
    system = {"role": "system", "content": " ".join(["the quick brown fox jumps over the lazy dog"] * 6)}
    conversations = [[system, *c] for c in chats(3)]
    got = prepack.generate(model, conversations, processor=processor, max_new_tokens=6)
    first = prepack.prefill(model, conversations, processor=processor)
    assert first.shared_tokens == 0
    for mine, c, logits in zip(got, conversations, first.logits, strict=True):
        o = alone(processor, c)
        with torch.no_grad():
            want = model.generate(**o, max_new_tokens=6, do_sample=False)[0, o["input_ids"].shape[1]:]
            assert (model(**o).logits[0, -1] - logits).abs().max() <= 1e-4
        assert mine.tokens.tolist() == want.tolist()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_of_chats_with_images_matches_each_chats_base_model_alone(pooling):
    model, processor = qwen("qwen2_5_vl")
    conversations = chats(4)
    got = prepack.embed(model, conversations, processor=processor, pooling=pooling)
    for vector, c in zip(got, conversations, strict=True):
        with torch.no_grad():
            hidden = model.model(**alone(processor, c)).last_hidden_state[0]  # (L, D), final norm applied
        want = hidden.mean(0) if pooling == "mean" else hidden[-1]
        assert (vector - want).abs().max() <= 1e-4


def test_classify_with_processor_refuses_a_model_without_a_classification_head():
    model, processor = qwen("qwen2_vl")
    with pytest.raises(TypeError, match="has no sequence-classification head"):
        prepack.classify(model, chats(2), processor=processor)


def test_a_chat_with_an_image_but_no_processor_is_refused():
    model, processor = qwen("qwen2_vl")
    with pytest.raises(ValueError, match="request 1 is a chat with an image entry; pass processor="):
        prepack.prefill(model, chats(2), tokenizer=processor.tokenizer)


def test_video_inputs_are_refused_naming_the_model_and_the_feature():
    model, processor = qwen("qwen2_vl")
    batch = dict(alone(processor, chats(2)[1]))
    batch["pixel_values_videos"] = torch.zeros(4, 1176)
    with pytest.raises(UnsupportedModelError, match="Qwen2VLForConditionalGeneration: video inputs .*pixel_values_videos.* not implemented"):
        prepack.prefill(model, batch)


def test_image_tokens_without_pixel_values_are_refused_naming_the_request():
    model, processor = qwen("qwen2_vl")
    batch = {k: v for k, v in alone(processor, chats(2)[1]).items() if k not in ("pixel_values", "image_grid_thw")}
    with pytest.raises(ValueError, match="request 0 has 6 image tokens but the inputs carry no pixel_values, image_grid_thw"):
        prepack.prefill(model, batch)


def test_images_on_a_row_backend_are_refused():
    model, processor = qwen("qwen2_vl")
    with pytest.raises(ValueError, match="prompts with images run on a varlen backend"):
        prepack.prefill(model, chats(2), processor=processor, backend="sdpa_masked")


def test_llava_prefill_and_generate_with_images_match_each_chat_alone():
    model, processor = llava_model(), llava_processor()
    conversations = chats(5)
    outs = [alone(processor, c) for c in conversations]
    want = torch.stack([lo[-1] for lo in alone_logits(model, outs)])
    assert (prepack.prefill(model, conversations, processor=processor).logits - want).abs().max() <= 1e-4
    got = prepack.generate(model, conversations, processor=processor, max_new_tokens=6)
    for mine, o in zip(got, outs, strict=True):
        with torch.no_grad():
            assert mine.tokens.tolist() == model.generate(**o, max_new_tokens=6, do_sample=False)[0, o["input_ids"].shape[1]:].tolist()


def test_gemma3_with_images_is_refused_for_its_bidirectional_image_attention_but_text_prompts_still_pack():
    model = gemma3_model()
    ids = torch.tensor([[5, 131, 130, 130, 130, 130, 132, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(1, 3, 28, 28),
             "token_type_ids": (ids == 130).long()}
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration cannot take prompts with images.*bidirectionally"):
        prepack.prefill(model, batch)
    text = prompts([5, 9, 3])
    assert (prepack.prefill(model, text).logits - alone_last_logits(model, text)).abs().max() <= 1e-4


def test_a_processor_output_without_images_packs_as_text_even_for_gemma3():
    model = gemma3_model()
    text = prompts([5, 9, 3])
    ids, mask = left_pad(text)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}  # all text
    assert (prepack.prefill(model, batch).logits - alone_last_logits(model, text)).abs().max() <= 1e-4


def test_score_with_images_equals_each_continuations_log_probability_alone():
    model, processor = qwen("qwen2_vl")
    conversations = chats(4)
    answers = ["the lazy dog", "hello world", "how are you today", "fox"]
    got = prepack.score(model, list(zip(conversations, answers)), processor=processor)
    for (logprob, greedy), c, a in zip(got, conversations, answers, strict=True):
        o = alone(processor, c)
        cont = torch.tensor(processor.tokenizer(a, add_special_tokens=False)["input_ids"])
        ids = torch.cat([o["input_ids"][0], cont])[None]
        types = torch.cat([o["mm_token_type_ids"][0], torch.zeros(len(cont), dtype=torch.long)])[None]
        extra = {k: o[k] for k in ("pixel_values", "image_grid_thw") if k in o}
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=types, **extra).logits[0, -len(cont) - 1 : -1]
        want = torch.log_softmax(logits, -1).gather(1, cont[:, None]).sum().item()
        assert abs(logprob - want) <= 1e-4
        assert greedy == bool((logits.argmax(-1) == cont).all())


def test_generate_admits_prompts_with_images_over_several_steps_and_samples_each_alone():
    model, processor = qwen("qwen2_vl")
    conversations = chats(5)
    # two at a time: prompts with images join decode steps of others; top_k=1 sampling is greedy, two samples each
    got = prepack.generate(model, conversations, processor=processor, max_new_tokens=6, max_batch=2,
                           num_return_sequences=2, do_sample=True, top_k=1)
    for i, c in enumerate(conversations):
        o = alone(processor, c)
        with torch.no_grad():
            want = model.generate(**o, max_new_tokens=6, do_sample=False)[0, o["input_ids"].shape[1]:].tolist()
        assert got[2 * i].tokens.tolist() == want and got[2 * i + 1].tokens.tolist() == want


def test_an_image_text_to_text_type_not_checked_against_the_model_alone_is_refused_naming_it():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=136)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(text_config=text, vision_config=vision, image_token_id=130)).eval()
    batch = {"input_ids": torch.tensor([[3, 130, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(1, 1, 3, 28, 28), "image_sizes": torch.tensor([[28, 28]])}
    with pytest.raises(UnsupportedModelError, match=r"LlavaNextForConditionalGeneration \(llava_next\) is not a vision-language model prepack has checked"):
        prepack.prefill(model, batch)
