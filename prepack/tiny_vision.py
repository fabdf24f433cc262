"""Tiny random-weight vision-language models, their processors, images and chats, built offline.

The vision sibling of :mod:`prepack.tiny`, for docs/vision.md's examples, the vision tests (inference: prefill, generate, score, embed; training: the vision collator), the vision
benchmarks and the docs' examples: a Qwen2-VL, a Qwen2.5-VL (windowed vision tower) and a Qwen3-VL
(deepstack features), all mRoPE with images as (patches, C*t*p*p) and ``image_grid_thw``; a LLaVA (a CLIP
tower, images as (n, C, H, W), image features spliced into a 1-D position stream); and a Gemma 3 (SigLIP).
The processors are the models' own classes with PIL-backed image processors (torchvision does not load
here) and no video processor, around an offline BPE tokenizer (:func:`tokenizer`) with the vision
special tokens added and a chat template that places image entries. Images are drawn in code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def tokenizer(vocab_size: int = 128):
    """A BPE tokenizer trained offline on a few sentences, as transformers wraps one (pad, eos, chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "the quick brown fox jumps over the lazy dog", "packing prompts removes the padding from the prefill",
        "a user asks a question and the assistant answers it", "hello world how are you today",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    out.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    return out


QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # where a Qwen-VL prompt's text places an image
LLAVA_IMAGE = "<image>"
LLAVA_PIXELS = 28  # every LLaVA image is resized to 28 x 28: 2 x 2 patches of 14, so 4 image tokens (CLS dropped)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
VOCAB = 136  # the offline tokenizer's ids plus the vision tokens fit below this


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image, drawn in code. A Qwen2-VL / Qwen2.5-VL image of (28 a) x (28 b) pixels is a x b tokens."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _template(image_text: str) -> str:
    return (
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_text + "{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )


def _vision_tokenizer(tokens):
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tokens})
    return tok


def _image_only(processor_class):
    """``processor_class`` without a video processor: transformers checks each processor attribute against its
    base class, and the video base class needs torchvision, which does not load here."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{processor_class.__name__}ImageOnly"
    return ImageOnly


def qwen_processor(model_type: str = "qwen2_vl"):
    """The Qwen-VL processor class of ``model_type`` with ``Qwen2VLImageProcessorPil`` (4 to 16 merged patches per image)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base, patch = {
        "qwen3_vl": (transformers.Qwen3VLProcessor, 16),
        "qwen2_5_vl": (transformers.Qwen2_5_VLProcessor, 14),
        "qwen2_vl": (transformers.Qwen2VLProcessor, 14),
    }[model_type]
    side = patch * 2
    ip = Qwen2VLImageProcessorPil(min_pixels=4 * side * side, max_pixels=16 * side * side, patch_size=patch)
    return _image_only(base)(image_processor=ip, tokenizer=_vision_tokenizer(QWEN_TOKENS), chat_template=_template(QWEN_IMAGE))


def qwen_model(model_type: str = "qwen2_vl", seed: int = 0, **text_config):
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (eval, fp32, sdpa) whose token ids match :func:`qwen_processor`.

    ``text_config``: overrides. Qwen2.5-VL's vision tower has a window of 2 x 2 merged patches on its first block,
    so images of more than 4 tokens are cut into windows; Qwen3-VL takes deepstack features from vision block 0.
    """
    import transformers

    tok = _vision_tokenizer(QWEN_TOKENS)
    start, end, img, vid = tok.convert_tokens_to_ids(QWEN_TOKENS)
    # mrope_section sums to head_dim / 2 (16 / 2 = 8): t, h and w each rotate part of every head
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(TEXT, vocab_size=VOCAB, rope_parameters=rope, bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    text.update(text_config)
    ids = dict(vision_start_token_id=start, vision_end_token_id=end, image_token_id=img, video_token_id=vid)
    if model_type == "qwen3_vl":
        text["head_dim"] = 16
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
        cls, cfg_cls = transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig
    elif model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        cls, cfg_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cls, cfg_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
    vision["hidden_size" if model_type == "qwen2_vl" else "out_hidden_size"] = text["hidden_size"]  # features fit the text
    torch.manual_seed(seed)
    return cls(cfg_cls(text_config=text, vision_config=vision, **ids)).eval()


def llava_processor():
    """LLaVA's processor with the PIL-backed CLIP image processor (every image resized to 28 x 28)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": LLAVA_PIXELS}, crop_size={"height": LLAVA_PIXELS, "width": LLAVA_PIXELS})
    return LlavaProcessor(ip, _vision_tokenizer([LLAVA_IMAGE]), patch_size=14, vision_feature_select_strategy="default",
                          chat_template=_template(LLAVA_IMAGE), num_additional_image_tokens=1)


def llava_model(seed: int = 0):
    """A tiny LLaVA (eval, fp32, sdpa): a llama text model and a CLIP vision tower, plain 1-D positions."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = _vision_tokenizer([LLAVA_IMAGE])
    text = dict(TEXT, model_type="llama", vocab_size=VOCAB, bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=LLAVA_PIXELS, patch_size=14, projection_dim=32)
    torch.manual_seed(seed)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids(LLAVA_IMAGE),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=4)
    return LlavaForConditionalGeneration(config).eval()


def gemma3_model(seed: int = 0):
    """A tiny Gemma 3 with a SigLIP tower (4 image tokens per image; image token 130, begin 131, end 132)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(TEXT, vocab_size=VOCAB, head_dim=16, sliding_window=6)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(seed)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=130,
                          boi_token_id=131, eoi_token_id=132)
    return Gemma3ForConditionalGeneration(config).eval()


# the families the vision collator trains: name -> the text that places one image in a prompt
FAMILIES = {"qwen2_vl": QWEN_IMAGE, "qwen2_5_vl": QWEN_IMAGE, "qwen3_vl": QWEN_IMAGE, "llava": LLAVA_IMAGE}


def model_and_processor(family: str, seed: int = 0):
    """(model, processor) of one of :data:`FAMILIES`."""
    if family == "llava":
        return llava_model(seed), llava_processor()
    return qwen_model(family, seed), qwen_processor(family)


def chats(n: int = 4, seed: int = 0) -> list:
    """n conversations with 0, 1 or 2 images of different sizes, and texts of different lengths."""
    words = "the quick brown fox jumps over the lazy dog hello world how are you today".split()
    sizes = [(56, 56), (84, 56), (56, 112)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        content = [{"type": "image", "image": image(*sizes[(i + j) % 3], seed=10 * i + j)} for j in range(i % 3)]
        content.append({"type": "text", "text": " ".join(rng.choice(words, 2 + 3 * i))})
        if i % 3 == 2:  # an image after the text too
            content.append({"type": "image", "image": image(*sizes[i % 3], seed=99 + i)})
        out.append([{"role": "user", "content": content}])
    return out


def alone(processor, chat) -> dict:
    """The model inputs of ``chat`` alone: its own processor output (a batch of one)."""
    return processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
