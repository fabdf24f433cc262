"""Tiny random-weight hybrid models (attention + gated delta-net or short-convolution layers), built from configs."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.models import VOCAB

BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# gated delta-net layers: small heads, 3 linear-attention layers to each attention layer (Qwen3.5's pattern)
GDN = dict(
    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
CONV = dict(num_hidden_layers=4, conv_L_cache=3, layer_types=["conv", "full_attention", "conv", "full_attention"])

# Kimi delta attention (KDA) layers beside MLA attention layers
KDA = dict(
    num_hidden_layers=3, layer_types=["linear_attention", "linear_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse"], num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8, qk_head_dim=24, moe_intermediate_size=32,
    num_experts=4, num_experts_per_token=2, num_shared_experts=1, num_expert_group=1, linear_head_dim=16,
    linear_num_heads=4, linear_conv_kernel_dim=4,
)

HYBRIDS = {
    "qwen3_5_text": dict(**GDN),
    "qwen3_5_moe_text": dict(**GDN, **MOE),
    "qwen3_next": dict(**GDN, **MOE),
    "olmo_hybrid": dict(**{**GDN, "num_key_value_heads": 4}),
    "lfm2": dict(**CONV),
    "lfm2_moe": dict(**CONV, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=1),
    "kimi_linear": dict(**KDA),
    "bailing_hybrid": dict(**KDA, expert_swiglu_limit_list=[0, 0, 0], share_expert_swiglu_limit_list=[0, 0, 0], topk_group=1,
                           num_nextn_predict_layers=0),
    # MiniMax: lightning (linear) attention layers beside attention layers, blocks of 4 tokens (prompts span several)
    "minimax": dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, block_size=4,
                    num_local_experts=4, num_experts_per_tok=2),
    # a sliding-window attention layer beside the convolutions
    "lfm3": dict(num_hidden_layers=3, conv_L_cache=5, head_dim=16, sliding_window=6,
                 layer_types=["conv", "full_attention", "sliding_attention"]),
}


def build_hybrid(model_type: str, **extra):
    """A tiny fp32 model of ``model_type`` (a key of :data:`HYBRIDS`), eval mode, seeded weights."""
    config = AutoConfig.for_model(model_type, **{**BASE, **HYBRIDS[model_type], **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
