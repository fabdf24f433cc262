"""Tiny random-weight decoder models built from configs: nothing is downloaded."""

import torch
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prepack import oracle
from prepack.tiny_vision import tokenizer  # noqa: F401 - the tests' BPE tokenizer (vocab 128), one copy

VOCAB = 128
COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
)
WINDOW = 6  # shorter than several prompts of the tests, so windows and chunks really cut
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    # a window shorter than several prompts, so the window really cuts
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=WINDOW)),
    # alternating sliding/global layers and attention logit soft-capping (eager by default)
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=30.0, query_pre_attn_scalar=20)
    ),
}
# one representative per further attention variant (the fast subset of benchmarks/model_zoo.py)
VARIANTS = {
    # attention sinks, alternating sliding/full layers
    "gpt_oss": lambda: GptOssForCausalLM(GptOssConfig(
        **COMMON, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
    )),
    # chunked local attention on 3 of 4 layers, a NoPE full-attention layer
    "llama4_text": lambda: Llama4ForCausalLM(Llama4TextConfig(
        **{**COMMON, "num_hidden_layers": 4}, head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
        attention_chunk_size=WINDOW, no_rope_layers=[1, 1, 1, 0],
    )),
    # MLA: keys of dim 16 + 8, values of dim 12, and the cache holds compressed latents
    "deepseek_v3": lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4}, head_dim=8, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    )),
    # per-layer sliding/full attention, NoPE on the full layers
    "cohere2": lambda: Cohere2ForCausalLM(Cohere2Config(
        **{**COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )),
}
ALL_ARCHITECTURES = {**ARCHITECTURES, **VARIANTS}

# RoPE of every type with its length threshold at ROPE_ORIG tokens, so that prompts of up to 40 tokens lie on both
# sides of it (tests/test_rope.py; the RoPE rows of benchmarks/model_zoo.py); for a head_dim of ROPE_HEAD_DIM.
ROPE_ORIG = 16
ROPE_HEAD_DIM = 16


def rope_parameters(rope_type: str) -> dict:
    """A config's ``rope_parameters`` for ``rope_type`` (a key of transformers' ``ROPE_INIT_FUNCTIONS``, or "default")."""
    half = ROPE_HEAD_DIM // 2
    extra = {
        "default": {},
        "linear": dict(factor=2.0),
        "dynamic": dict(factor=2.0),
        "yarn": dict(factor=4.0, original_max_position_embeddings=ROPE_ORIG),
        "longrope": dict(
            short_factor=[1.0 + 0.1 * i for i in range(half)], long_factor=[4.0 + 2.0 * i for i in range(half)],
            original_max_position_embeddings=ROPE_ORIG,
        ),
        "llama3": dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=ROPE_ORIG),
        "proportional": dict(partial_rotary_factor=0.5),
    }[rope_type]
    return dict(rope_type=rope_type, rope_theta=10000.0, **extra)


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return ALL_ARCHITECTURES[arch]().eval()


def prompts(lengths, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def alone_last_logits(model, seqs) -> torch.Tensor:
    """(N, V): each prompt run on its own, the ground truth."""
    return oracle.alone_last_logits(model, seqs)


def left_pad(seqs, pad_id: int = 0):
    """The library's own left padding (what model.generate gets), on CPU."""
    from prepack.jobs.generation import left_pad as _left_pad

    return _left_pad(seqs, pad_id, "cpu")


def cache_kwargs(model, cache) -> dict:
    """Pass ``cache`` under the name this transformers version uses (``cache``, formerly ``past_key_values``)."""
    from prepack.hf.registration import cache_kwarg

    return {cache_kwarg(model): cache, "use_cache": True}


def byte_tokenizer():
    """A byte-level BPE tokenizer (about 300 ids) whose tokens decode to text on their own, as stop strings need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["the quick brown fox jumps over the lazy dog", "hello world how are you today"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")


def build_llama_vocab(vocab_size: int, seed: int = 0):
    """The tiny llama with a vocabulary of ``vocab_size`` ids (for :func:`byte_tokenizer`)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": vocab_size})).eval()
