"""The current families that are not about recurrence: Gemma 4 (the multimodal class), Gemma 4 unified,
cross-layer KV sharing (Gemma 3n, Gemma 4), sparse-attention indexers, and keywords whose value is None.

Each model is checked against itself run on each prompt alone (:mod:`prepack.oracle`: the plain forward and
``model.generate`` on one prompt), through every entry point: prefill logits and caches, ``forward_at``,
``score`` and ``generate`` (the decode engine).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
)

import prepack
from prepack import oracle
from prepack.hf.causal_masks import is_plain_causal
from prepack.jobs.generation import generate_with_backends
from prepack.hf.support import UnsupportedModelError, kv_share_sources, layer_attention

from .models import VOCAB, WINDOW, prompts

LENGTHS = [1, 3, 7, 12, 20]  # several longer than the window
# a tiny Gemma 4 text stack: sliding and full layers, per-layer inputs of a tiny vocabulary
GEMMA4_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, max_position_embeddings=256, sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
GEMMA3N_TEXT = dict(
    vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=16,
    max_position_embeddings=256, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
    activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
FAMILIES = {
    # the multimodal class used as a causal LM: its layers get labels=None among their keywords
    "gemma4": lambda: Gemma4ForConditionalGeneration(Gemma4Config(text_config=GEMMA4_TEXT)),
    # bidirectional attention over image tokens: a text-only call composes an image-block overlay with no block
    "gemma4_unified": lambda: Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(text_config=GEMMA4_TEXT)),
    # the last two layers read the keys and values of the last sliding and the last full layer before them
    "gemma4_kv_shared": lambda: Gemma4ForCausalLM(Gemma4TextConfig(**GEMMA4_TEXT, num_kv_shared_layers=2)),
    "gemma3n_kv_shared": lambda: Gemma3nForCausalLM(Gemma3nTextConfig(**GEMMA3N_TEXT, num_kv_shared_layers=2)),
}
NEW_TOKENS = 4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]().eval()


@pytest.mark.parametrize("backend", ["sdpa_varlen", "sdpa_masked"])
def test_prefill_logits_and_caches_match_each_prompt_alone(family, backend):
    seqs = prompts(LENGTHS)
    want, caches = oracle.alone(family, seqs)
    result = prepack.prefill(family, seqs, backend=backend, token_budget=24)  # several forwards
    assert (result.logits - want).abs().max() <= 1e-4
    for mine, theirs in zip(result.dynamic_caches, caches):
        assert oracle.cache_gap(mine, theirs) <= 1e-4


def test_prompts_longer_than_the_token_budget_continue_their_earlier_keys_exactly(family):
    system = prompts([34], seed=1)[0]  # a prefix two prompts share: run once, continued by each
    seqs = prompts([40, 5], seed=1) + [torch.cat([system, p]) for p in prompts([3, 6], seed=7)]
    want, caches = oracle.alone(family, seqs)
    result = prepack.prefill(family, seqs, token_budget=16)  # each long prompt runs in pieces over earlier keys
    assert (result.logits - want).abs().max() <= 1e-4
    for mine, theirs in zip(result.dynamic_caches, caches):
        assert oracle.cache_gap(mine, theirs) <= 1e-4


def test_forward_at_every_position_matches_the_plain_forward(family):
    seqs = prompts(LENGTHS, seed=2)
    got = prepack.forward_at(family, seqs, "all")
    with torch.no_grad():
        for g, s in zip(got, seqs):
            assert (g - family(s[None]).logits[0]).abs().max() <= 1e-4


def test_score_matches_log_softmax_of_each_request_alone(family):
    shared = prompts([9], seed=3)[0].tolist()
    requests = [(shared, [5, 6, 7]), (shared, [8]), ([4, 9, 10], [11, 12])]  # a shared context, scored once
    got = prepack.score(family, requests)
    with torch.no_grad():
        for (ctx, cont), s in zip(requests, got):
            ids = torch.tensor(ctx + cont)
            logp = torch.log_softmax(family(ids[None]).logits[0].float(), -1)
            want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            assert abs(s.logprob - want) <= 1e-4


def test_generate_gives_each_prompt_what_model_generate_gives_it_alone(family):
    seqs = prompts(LENGTHS, seed=4)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    got = prepack.generate(family, seqs, token_budget=16, **kwargs)  # long prompts prefilled in chunks beside decodes
    for g, s in zip(got, seqs):
        assert g.tokens.tolist() == oracle.alone_generate(family, s, **kwargs)


# ---------------------------------------------------------------- cross-layer KV sharing


def test_kv_share_sources_map_each_reusing_layer_to_the_storing_layer_of_its_type():
    config = Gemma3nTextConfig(**GEMMA3N_TEXT, num_kv_shared_layers=2)
    assert config.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    assert kv_share_sources(config) == {2: 0, 3: 1}
    assert kv_share_sources(Gemma3nTextConfig(**GEMMA3N_TEXT, num_kv_shared_layers=0)) == {}


def test_a_layer_reusing_keys_no_layer_of_the_model_computes_is_refused():
    # every layer shared: a drafter's, whose keys come from its target model's forward
    config = Gemma4TextConfig(**{**GEMMA4_TEXT, "vocab_size_per_layer_input": 0, "hidden_size_per_layer_input": 0},
                              num_kv_shared_layers=4)
    with pytest.raises(UnsupportedModelError, match="no layer of this model computes"):
        kv_share_sources(config)


def test_the_engine_keeps_no_pool_for_a_layer_that_reads_another_layers_keys():
    torch.manual_seed(0)
    shared = FAMILIES["gemma3n_kv_shared"]().eval()
    torch.manual_seed(0)
    plain = Gemma3nForCausalLM(Gemma3nTextConfig(**GEMMA3N_TEXT, num_kv_shared_layers=0)).eval()
    seqs = prompts([5, 9])
    per_token = {}
    for name, model in (("shared", shared), ("plain", plain)):
        out = generate_with_backends(model, seqs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        per_token[name] = out.stats.kv_bytes_per_token
    assert per_token["shared"] * 2 == per_token["plain"]  # 2 of 4 layers read the others' entries


# ---------------------------------------------------------------- keywords whose value is None


class _Layer(torch.nn.Module):
    is_causal = True
    layer_idx = 0


def test_a_keyword_whose_value_is_none_asks_for_nothing():
    assert layer_attention(_Layer(), {"labels": None, "token_type_ids": None}, 4).window is None


def test_an_unknown_keyword_with_a_value_is_refused():
    with pytest.raises(UnsupportedModelError, match="labels"):
        layer_attention(_Layer(), {"labels": torch.zeros(1, 4, dtype=torch.long)}, 4)


# ---------------------------------------------------------------- which composed masks need no (T, T) mask


def test_the_mask_compositions_transformers_builds_are_recognised_by_their_names():
    # these names are what prepack reads (prepack.hf.causal_masks); a rename in transformers fails here
    from transformers import masking_utils as mu

    text = torch.full((1, 5), -1)
    image = torch.tensor([[-1, 0, 0, -1, -1]])
    assert is_plain_causal(mu.causal_mask_function)
    assert is_plain_causal(mu.sliding_window_causal_mask_function(4))
    assert is_plain_causal(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)))
    packed = mu.packed_sequence_mask_function(torch.zeros(1, 5, dtype=torch.long))
    remapped = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, torch.arange(5)[None])
    assert is_plain_causal(mu.and_masks(remapped, packed))
    assert is_plain_causal(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(text)))  # a text-only call
    # an image block attends bidirectionally: the model's own mask, even under a packed-sequence restriction
    assert not is_plain_causal(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(image)))
    assert not is_plain_causal(mu.and_masks(mu.or_masks(remapped, mu.blockwise_overlay(image)), packed))
    assert not is_plain_causal(mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(1, 5, dtype=torch.bool))))
    assert not is_plain_causal(mu.bidirectional_mask_function)


def test_a_call_with_an_image_block_is_still_refused_in_a_packed_layout():
    torch.manual_seed(0)
    model = FAMILIES["gemma4_unified"]().eval()
    ids = prompts([6])[0][None]
    types = torch.tensor([[0, 1, 1, 1, 0, 0]])  # three image-token positions: a bidirectional block
    with prepack.hf.registration.switched(model), pytest.raises(UnsupportedModelError, match="attention mask together with a packed"):
        model(input_ids=ids, mm_token_type_ids=types, position_ids=torch.arange(6)[None], use_cache=False,
              cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32), cu_seq_lens_k=torch.tensor([0, 6], dtype=torch.int32),
              max_length_q=6, max_length_k=6)


# ---------------------------------------------------------------- sparse attention


@pytest.mark.parametrize("model_type, module", [
    ("deepseek_v32", "DeepseekV32Indexer"), ("glm_moe_dsa", "GlmMoeDsaIndexer"), ("deepseek_v4", "Compressor"),
])
def test_sparse_attention_is_refused_naming_the_module_and_why(model_type, module):
    from transformers import AutoConfig, AutoModelForCausalLM

    default = AutoConfig.for_model(model_type)
    with torch.device("meta"):  # the structure is what is judged: no weights needed
        model = AutoModelForCausalLM.from_config(default)
    with pytest.raises(UnsupportedModelError, match=f"{module}.*(other requests' keys|two requests' tokens)"):
        prepack.hf.support.check_model(model)


def test_a_reading_layer_attends_to_its_source_layers_pool_and_writes_none():
    from prepack.executor.kvstore import KVStore

    store = KVStore("cpu", reads={1: 0})
    kv = store.plan({0: 3, 1: 2})
    key = torch.randn(1, 2, 5, 4)
    value = torch.randn(1, 2, 5, 4)
    own = kv.extend(0, key, value)
    read = kv.extend(1, key, value)  # the very tensors layer 0 got: transformers' shared_kv_states
    assert read[0].data_ptr() == own[0].data_ptr() and torch.equal(read[0], own[0])
    assert sorted(store.pools) == [0]  # no pool of its own
    with pytest.raises(UnsupportedModelError, match="should read layer 0's keys"):
        kv.extend(1, key.clone(), value)  # equal values, but not what layer 0 wrote: refused, never guessed
