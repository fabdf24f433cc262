"""Attention that prepack reaches although the model does not hand it ``prepack=``, and attention run several
times at one layer index per forward.

* Nemotron's and Falcon's decoder layers pass their attention the forward's ``position_ids`` but drop every other
  keyword: the layer finds the packed call by that tensor (:func:`prepack.executor.call.carried_by`). Falcon is not
  marked ``_supports_attention_backend``; its attention calls ``ALL_ATTENTION_FUNCTIONS`` all the same.
* DiffLlama calls attention twice per layer (the two halves of its values), HRM runs its two stacks in cycles with a
  cache slot per run: the KV store keeps one stream per call (``KVStore(revisits=True)``).
* A layer that gets no packed layout at all inside a prepack call is refused, never run across the packed prompts.

Each model is checked against itself on each prompt alone (:mod:`prepack.oracle`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
    DoryConfig,
    DoryForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    HrmTextConfig,
    HrmTextForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    NemotronConfig,
    NemotronForCausalLM,
)

import prepack
from prepack import oracle
from prepack.executor.kvstore import KVStore
from prepack.hf.registration import prepack_attention, switched
from prepack.hf.support import UnsupportedModelError

from .models import VOCAB, prompts

LENGTHS = [1, 3, 7, 12, 20]
NEW_TOKENS = 4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DORY = DoryConfig(**TINY, num_hidden_layers=4, head_dim=16, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"] * 2, n_input_layers=1, n_recurrent_layers=2,
                  n_output_layers=1)
FAMILIES = {
    # decoder layers that drop prepack= but pass position_ids on
    "nemotron": lambda: NemotronForCausalLM(NemotronConfig(**TINY, num_hidden_layers=2, head_dim=16)),
    "falcon": lambda: FalconForCausalLM(FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    # attention run twice per layer / per cycle, each call a stream of its own
    "diffllama": lambda: DiffLlamaForCausalLM(DiffLlamaConfig(**TINY, num_hidden_layers=2)),
    "hrm_text": lambda: HrmTextForCausalLM(HrmTextConfig(
        **TINY, head_dim=16, num_layers_per_stack=1, num_hidden_layers=6, H_cycles=2, L_cycles=2, L_bp_cycles=[1])),
    # recurrent depth: layers 1-2 run twice, the second loop into cache layers the model appends (4, 5)
    "dory": lambda: DoryForCausalLM(DORY),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]().eval()


@pytest.mark.parametrize("backend", ["sdpa_varlen", "sdpa_masked"])
def test_prefill_logits_and_caches_match_each_prompt_alone(family, backend):
    seqs = prompts(LENGTHS)
    want, caches = oracle.alone(family, seqs)
    result = prepack.prefill(family, seqs, backend=backend)
    assert (result.logits - want).abs().max() <= 1e-4
    for mine, theirs in zip(result.dynamic_caches, caches):
        assert oracle.cache_gap(mine, theirs) <= 1e-4


def test_prompts_continuing_their_earlier_keys_match_each_prompt_alone(family):
    system = prompts([14], seed=1)[0]  # a prefix two prompts share: run once, continued by each
    seqs = prompts([20, 5], seed=1) + [torch.cat([system, p]) for p in prompts([3, 6], seed=7)]
    want, _ = oracle.alone(family, seqs)
    result = prepack.prefill(family, seqs, token_budget=8)  # long prompts run in pieces over their earlier keys
    assert (result.logits - want).abs().max() <= 1e-4


def test_generate_gives_each_prompt_what_model_generate_gives_it_alone(family):
    seqs = prompts(LENGTHS, seed=4)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    got = prepack.generate(family, seqs, token_budget=8, **kwargs)  # prompts prefilled in chunks beside decodes
    for g, s in zip(got, seqs):
        assert g.tokens.tolist() == oracle.alone_generate(family, s, **kwargs)


def test_a_second_attention_call_at_one_layer_index_is_refused_unless_the_class_is_known():
    store = KVStore("cpu")
    step = store.plan({0: 3})
    k = torch.randn(1, 2, 3, 8)
    step.extend(0, k, k)
    with pytest.raises(UnsupportedModelError, match="went through attention twice"):
        step.extend(0, k, k)


def test_a_layer_with_no_packed_layout_inside_a_prepack_call_is_refused():
    model = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=1)).eval()
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 5, 16)
    with switched(model), pytest.raises(UnsupportedModelError, match="got no packed layout"):
        prepack_attention(attn, q, kv, kv, None)  # no prepack=, no position_ids: it cannot tell the prompts apart
    out, _ = prepack_attention(attn, q, kv, kv, None)  # outside a prepack call: the model's own causal attention
    assert out.shape == (1, 5, 4, 16)


def test_falcon_with_alibi_is_refused_naming_the_bias():
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                           alibi=True)).eval()
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        prepack.prefill(model, prompts([3, 5]))


def test_doges_dynamic_mask_attention_is_refused_naming_the_module():
    from transformers import DogeConfig, DogeForCausalLM

    model = DogeForCausalLM(DogeConfig(**TINY, num_hidden_layers=1)).eval()
    with pytest.raises(UnsupportedModelError, match="DogeAttention builds its own attention mask"):
        prepack.prefill(model, prompts([3, 5]))


def test_dorys_appended_cache_layers_are_in_every_cache_prepack_builds():
    torch.manual_seed(0)
    model = DoryForCausalLM(DORY).eval()
    seqs = prompts([5, 9, 3], seed=5)
    result = prepack.prefill(model, seqs)
    assert result.layer_copies == {4: 1, 5: 2}  # loop 2 of layers 1 and 2
    cache, mask = result.left_padded_cache()
    assert len(cache.layers) == 6
    longest = max(len(s) for s in seqs)
    ids = torch.stack([torch.cat([torch.zeros(longest - len(s), dtype=torch.long), s]) for s in seqs])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    for row, s in zip(out[:, longest:].tolist(), seqs):
        want = oracle.alone_generate(model, s, **kwargs)
        assert row[: len(want)] == want


def test_dory_whose_early_loops_read_the_last_loops_keys_is_refused():
    config = DoryConfig(**{**DORY.to_dict(), "recurrent_kv_cache_mode": "last_loop"})
    with pytest.raises(UnsupportedModelError, match="recurrent_kv_cache_mode='last_loop'"):
        prepack.prefill(DoryForCausalLM(config).eval(), prompts([3, 5]))
