"""The models the benchmark runs: built-in presets with seeded random weights, or a local HF checkpoint.

Nothing is downloaded. Random weights are enough to time prefill, because the
cost of a forward pass depends on the shapes, not on the values; every method
is still checked to predict the same next token (see :mod:`prepack.bench.measure`).
"""

from __future__ import annotations

import os

import torch

PRESETS = ("llama-tiny", "llama-small", "qwen2-small")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def preset_config(name: str):
    """The transformers config of a built-in preset (random weights, no download).

    ``llama-tiny`` is for smoke tests (1024-token vocab: prompts are folded into it,
    see :func:`prepack.bench.prompts.fit_vocab`). ``llama-small`` / ``qwen2-small`` have a
    100352-token vocab, so cl100k ids (< 100277) fit unchanged. EOS is unset so that
    every method decodes exactly ``new_tokens`` tokens.
    """
    from transformers import LlamaConfig, Qwen2Config

    common = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    small = dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=100352, max_position_embeddings=4096, **common,
    )
    if name == "llama-tiny":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, **common,
        )
    if name == "llama-small":
        return LlamaConfig(**small)
    if name == "qwen2-small":
        return Qwen2Config(**small)
    raise ValueError(f"unknown model preset {name!r}; choose {', '.join(PRESETS)} or a local model dir")


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A built-in preset with seeded random weights, or a local HF model dir (``local_files_only=True``).

    Either way the model's attention implementation is ``sdpa``: it is what the
    padded and sorted methods run, and the ``backend`` column of the results says so.
    """
    from transformers import AutoModelForCausalLM

    if name in PRESETS:
        torch.manual_seed(seed)
        config = preset_config(name)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
    elif os.path.isdir(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True, attn_implementation="sdpa")
    else:
        raise ValueError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory")
    return model.to(device).eval()
