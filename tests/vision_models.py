"""Tiny random-weight vision-language models and their processors, built from configs offline.

Shared by the vision tests: a Qwen2-VL, a Qwen2.5-VL (windowed vision tower) and a Qwen3-VL (deepstack
features), all mRoPE with images as (patches, C*t*p*p) and ``image_grid_thw``; and a LLaVA (a CLIP tower,
images as (n, C, H, W), image features spliced into a 1-D position stream). The processors are
transformers' own, with PIL-backed image processors (torchvision does not load here), the offline BPE
tokenizer of ``tests/models.py`` plus the vision special tokens, and no video processor. Images are drawn in code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import models

QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_IMAGE = "<image>"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # where a Qwen-VL prompt's text places an image
PATCH = 4  # Qwen patch size; merged 2x2 into one token, so a 16x24 image is 4x6 patches -> 6 tokens
CLIP_IMAGE, CLIP_PATCH = 16, 8  # LLaVA: a 16x16 image is 2x2 patches -> 4 tokens (CLS dropped)


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image drawn in code."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tokenizer(special: list[str]):
    tok = models.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": special})
    return tok


def _text_config(tok) -> dict:
    return dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _qwen(config_class, model_class, processor_class, vision: dict, seed: int, rope: dict | None = None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rope = rope or {}
    tok = _tokenizer(QWEN_SPECIAL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = _text_config(tok)
    # mrope_section sums to head_dim / 2 (16 / 2 = 8): t, h and w each rotate part of every head
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], **rope}
    config = config_class(
        text_config=text,
        vision_config=dict(patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, depth=2, num_heads=2, **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    images = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=32 * 32,
    )
    return model, _image_only(processor_class)(image_processor=images, tokenizer=tok)


def qwen2_vl(seed: int = 0):
    """(model, processor): a tiny Qwen2-VL in eval mode, fp32, sdpa, and its processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2)
    return _qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision, seed)


def qwen2_5_vl(seed: int = 0):
    """(model, processor): a tiny Qwen2.5-VL in eval mode, fp32, sdpa, and its processor.

    Its vision tower has a window of 2x2 merged patches on the first block, so images of more than
    4 tokens are cut into windows.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1])
    return _qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision, seed)


def qwen3_vl(seed: int = 0):
    """(model, processor): a tiny Qwen3-VL (interleaved mRoPE, deepstack features from vision block 0), eval, fp32, sdpa."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0])
    return _qwen(Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, vision, seed, rope={"mrope_interleaved": True})


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


def llava(seed: int = 0):
    """(model, processor): a tiny LLaVA (CLIP tower, Llama text model) in eval mode, fp32, sdpa, and its processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = _tokenizer([LLAVA_IMAGE])
    config = LlavaConfig(
        text_config={"model_type": "llama", **_text_config(tok)},
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH, projection_dim=32,
        ),
        image_token_id=tok.convert_tokens_to_ids(LLAVA_IMAGE), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    images = LlavaImageProcessorPil(
        size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE},
    )
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=CLIP_PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


# name -> (builder, the text that places one image in a prompt)
FAMILIES = {
    "qwen2_vl": (qwen2_vl, QWEN_IMAGE), "qwen2_5_vl": (qwen2_5_vl, QWEN_IMAGE), "qwen3_vl": (qwen3_vl, QWEN_IMAGE),
    "llava": (llava, LLAVA_IMAGE),
}
