"""RoPE whose frequencies depend on the sequence length: every request gets what it would get alone, or a refusal.

transformers' ``dynamic_rope_update`` picks a forward's frequencies from its longest position;
a packed forward's longest position is its longest request's. These tests put prompts on both
sides of ``original_max_position_embeddings`` (ROPE_ORIG) in one call and compare each with the
model run on it alone.
"""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import prepack
from prepack.hf.rope import rope_dependence
from prepack.hf.support import UnsupportedModelError
from tests.models import COMMON, ROPE_HEAD_DIM, ROPE_ORIG, alone_last_logits, prompts, rope_parameters

# prompts on both sides of ROPE_ORIG, the short ones packed beside long ones
LENGTHS = [10, 40, 16, 17, 5, 15]
TOL = 1e-4  # logits of a few units, float32


def build(family: str, rope_type: str, max_positions: int = 4 * ROPE_ORIG):
    # a wide initialisation, so that a wrong frequency moves greedy tokens too
    common = {**COMMON, "max_position_embeddings": max_positions, "head_dim": ROPE_HEAD_DIM, "initializer_range": 0.3}
    params = rope_parameters(rope_type)
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=params))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_parameters=params))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, rope_parameters=params))
    elif family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(
            **common, pad_token_id=0, eos_token_id=2, bos_token_id=1, original_max_position_embeddings=ROPE_ORIG, rope_parameters=params,
        ))
    elif family == "gemma3":  # per-layer-type RoPE: the global layers scaled, the local ones default
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": params, "sliding_attention": rope_parameters("default")},
        ))
    else:
        raise ValueError(family)
    return model.eval()


def test_every_installed_rope_type_is_covered_here():
    assert set(ROPE_INIT_FUNCTIONS) <= {"linear", "dynamic", "yarn", "longrope", "llama3", "proportional"}


@pytest.mark.parametrize("rope_type", sorted(ROPE_INIT_FUNCTIONS))
def test_prefill_matches_each_prompt_alone_for_every_rope_type_within_the_original_length(rope_type):
    model = build("llama", rope_type)
    seqs = prompts(LENGTHS)
    want = alone_last_logits(model, seqs)
    got = prepack.prefill(model, seqs, backend="sdpa_varlen").logits
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("backend", ["sdpa_varlen", "sdpa_masked"])
def test_longrope_prompts_on_both_sides_of_the_original_length_match_each_alone(family, backend):
    model = build(family, "longrope")
    seqs = prompts(LENGTHS)
    want = alone_last_logits(model, seqs)
    got = prepack.prefill(model, seqs, backend=backend).logits
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


def test_longrope_caches_match_each_prompt_alone():
    model = build("phi3", "longrope")
    seqs = prompts([10, 40])
    result = prepack.prefill(model, seqs)
    with torch.no_grad():
        alone = model(seqs[0][None], use_cache=True).past_key_values
    assert len(result.dynamic_caches) == 2
    assert (result.dynamic_caches[0].layers[0].keys - alone.layers[0].keys).abs().max() <= TOL


def test_longrope_detected_from_the_rotary_module_not_the_model_name():
    assert rope_dependence(build("llama", "longrope")) is not None
    assert rope_dependence(build("gemma3", "longrope")) is not None
    for rope_type in ("default", "linear", "yarn", "llama3", "proportional"):
        assert rope_dependence(build("llama", rope_type)) is None, rope_type


def test_longrope_generate_matches_each_prompt_generated_alone():
    model = build("phi3", "longrope")
    seqs = prompts([10, 40, 4, 17, 5, 20])  # each stays on one side of ROPE_ORIG while decoding 5 tokens
    got = prepack.generate(model, seqs, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(got) == len(seqs)
    for s, g in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = model.generate(s[None], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert g.tokens.tolist() == want[0, len(s):].tolist()


def test_longrope_generate_across_the_original_length_is_refused():
    """Alone, Phi-3's generate recomputes its cache when it crosses ROPE_ORIG: model-specific, so refused, not guessed."""
    model = build("phi3", "longrope")
    with pytest.raises(UnsupportedModelError, match=r"request 1 has 14 tokens and would decode up to 18 positions, across"):
        prepack.generate(model, prompts([10, 14]), max_new_tokens=5, do_sample=False, pad_token_id=0)


def test_longrope_score_with_a_shared_context_across_the_original_length_matches_alone():
    model = build("phi3", "longrope")
    ctx = prompts([12])[0].tolist()
    conts = [prompts([3], seed=1)[0].tolist(), prompts([9], seed=2)[0].tolist()]  # 14 and 20 tokens run
    got = prepack.score(model, [(ctx, c) for c in conts])
    assert len(got) == len(conts)
    for c, s in zip(conts, got, strict=True):
        ids = torch.tensor(ctx + c)[None, :-1]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        want = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(c))
        assert abs(s.logprob - want) <= 1e-4


def test_dynamic_ntk_prompts_within_max_positions_are_exact():
    model = build("qwen2", "dynamic")
    seqs = prompts([10, 64, 3])
    want = alone_last_logits(model, seqs)
    assert (prepack.prefill(model, seqs).logits - want).abs().max() <= TOL


def test_dynamic_ntk_generate_that_would_decode_past_max_positions_is_refused():
    model = build("llama", "dynamic")
    with pytest.raises(UnsupportedModelError, match=r"request 1 has 67 tokens.*'dynamic'.*at most 64 positions"):
        prepack.generate(model, prompts([10, 60]), max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_dynamic_ntk_generate_within_max_positions_matches_each_prompt_alone():
    model = build("llama", "dynamic")
    seqs = prompts([10, 50])
    got = prepack.generate(model, seqs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(got) == len(seqs)
    for s, g in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = model.generate(s[None], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert g.tokens.tolist() == want[0, len(s):].tolist()
