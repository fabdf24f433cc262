"""Exact or refused, one representative per attention variant (the fast subset of benchmarks/model_zoo.py).

Each exact family: packed last-token logits equal each prompt alone, each request's cache equals a
solo prefill's cache, and greedy tokens equal left-padded ``model.generate``. Each refused family:
prepack raises ``UnsupportedModelError`` naming the model and the reason, before computing anything.
"""

import pytest
import torch
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
)

import prepack
from prepack.support import UnsupportedModelError

from .models import COMMON, alone_last_logits, cache_kwargs, prompts
from .test_generate import padded_generate

WINDOW = 6  # shorter than most prompts below, so windows and chunks really cut
LENGTHS = [1, 5, 17, 3, 12, 7, 9]
BUDGET = 24  # fewer tokens than the prompts hold: several forwards

ARCHITECTURES = {
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


def build(arch):
    torch.manual_seed(0)
    return ARCHITECTURES[arch]().eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_logits_match_each_prompt_alone(arch):
    model, seqs = build(arch), prompts(LENGTHS)
    result = prepack.prefill(model, seqs, token_budget=BUDGET)
    assert result.batch.num_rows > 1
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa_masked", "flex"])
@pytest.mark.parametrize("arch", ["gpt_oss", "llama4_text", "deepseek_v3"])
def test_every_cpu_backend_gives_exact_logits(arch, backend):
    model, seqs = build(arch), prompts(LENGTHS)
    result = prepack.prefill(model, seqs, backend=backend)
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_cache_holds_what_a_solo_prefill_caches(arch):
    from transformers import DynamicCache

    model, seqs = build(arch), prompts([3, 11, 8])
    result = prepack.prefill(model, seqs)
    for seq, cache in zip(seqs, result.dynamic_caches):
        alone = DynamicCache(config=model.config)
        with torch.no_grad():
            model(seq[None], **cache_kwargs(model, alone))
        for mine, theirs in zip(cache.layers, alone.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_matches_padded_greedy(arch):
    model, seqs = build(arch), prompts(LENGTHS)
    want = padded_generate(model, seqs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    got = prepack.generate(model, seqs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert [g.tolist() for g in got] == want


def test_convolution_hybrid_is_refused_before_anything_runs():
    torch.manual_seed(0)
    model = Lfm2ForCausalLM(Lfm2Config(
        **{**COMMON, "num_hidden_layers": 2}, layer_types=["conv", "full_attention"],
    )).eval()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedModelError, match="Lfm2ForCausalLM cannot be packed exactly: .*convolution over tokens"):
        prepack.prefill(model, prompts([3, 4]))
    assert not calls


def test_a_hybrid_is_refused_from_its_structure_not_its_name():
    from tests.models import build as build_plain

    model = build_plain("llama")
    model.model.layers[0].token_mixer = torch.nn.Conv1d(64, 64, 3, groups=64)  # a new, unnamed hybrid
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM cannot be packed exactly: .*layers.0.token_mixer"):
        prepack.prefill(model, prompts([3, 4]))


def test_recurrent_cache_layer_types_are_refused():
    from tests.models import build as build_plain

    model = build_plain("llama")
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="'linear_attention' \\(linear-attention / recurrent layers\\)"):
        prepack.prefill(model, prompts([3, 4]))


# ---------------------------------------------------------------- refuse by default, in the attention function


class _Attention(torch.nn.Module):
    """An attention module as transformers passes it to the attention function."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True


def _call(module, q=None, k=None, v=None, cu=None, **kwargs):
    from prepack.hf import prepack_attention

    if q is None:
        q = k = v = torch.randn(1, 2, 6, 8)
        cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return prepack_attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, **kwargs)


def test_an_attention_keyword_prepack_does_not_implement_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="_Attention \\(layer 0\\) passed attention keyword\\(s\\) position_bias"):
        _call(_Attention(LlamaConfig()), position_bias=torch.zeros(1))


def test_a_sliding_layer_whose_call_carries_no_window_uses_its_configs_window():
    from transformers import LlamaConfig

    config = LlamaConfig(sliding_window=2)
    config.layer_types = ["sliding_attention"]
    q = k = v = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = _call(_Attention(config), q, k, v, cu)
    flat = q.transpose(1, 2).reshape(6, 2, 8)
    want = prepack.get_backend("reference")(flat, flat, flat, cu, cu, 4, 4, causal=True, window_size=(1, 0))
    torch.testing.assert_close(out[0], want)
    unwindowed = prepack.get_backend("reference")(flat, flat, flat, cu, cu, 4, 4, causal=True)
    assert (out[0] - unwindowed).abs().max() > 1e-3


def test_a_sliding_layer_with_no_window_anywhere_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.layer_types, config.sliding_window = ["sliding_attention"], None
    with pytest.raises(UnsupportedModelError, match="sliding-window layer but neither its call nor its config gives a window"):
        _call(_Attention(config))


def test_a_module_with_sinks_whose_call_omits_them_is_refused():
    from transformers import LlamaConfig

    module = _Attention(LlamaConfig())
    module.sinks = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UnsupportedModelError, match="has attention sinks but its call did not pass them"):
        _call(module)


def test_a_config_that_soft_caps_but_a_call_that_does_not_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.attn_logit_softcapping = 50.0
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping=50.0"):
        _call(_Attention(config))


def test_non_causal_attention_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="asks for non-causal attention"):
        _call(_Attention(LlamaConfig()), is_causal=False)
