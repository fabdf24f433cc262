"""``prepack.generate`` on hybrid models: each request's conv and recurrent state held across steps.

Oracle: ``model.generate`` on each prompt alone (greedy, or seeded per request). The runs below chunk
prompts over several steps (a small ``token_budget``), share identical prompts and a common prefix
(a region's final state copied into each request that continues it), and decode every running request
in one call of each mixer's own forward.
"""

import pytest
import torch

import prepack
from prepack.executor.kvstore import KVStore
from prepack.jobs.generation import generate_with_backends
from prepack.mixers.states import HeldStates

from .hybrid_models import HYBRIDS, build_hybrid, random_prompts
from .ssm_models import build_ssm
from .ssm_models import random_prompts as ssm_prompts
from .test_generate import alone, tokens

# merged-parts attention (prefix sharing) is exact for these; lfm3's sliding window is not merged, so it only chunks
NO_SHARING = {"lfm3"}
SSM = ("mamba", "falcon_mamba", "mamba2", "falcon_h1", "nemotron_h", "zamba", "zamba2", "jamba")


def _prompts(make) -> list[torch.Tensor]:
    """Prompts that exercise every path: chunks (> the budget), a one-token prompt, an identical pair, a shared prefix."""
    seqs = make([5, 40, 1, 12, 9])
    seqs += [list(seqs[0]), seqs[1][:34] + [7, 8, 9]]
    return [torch.tensor(s) for s in seqs]


@pytest.mark.parametrize("model_type", sorted(HYBRIDS) + [f"ssm:{t}" for t in SSM])
def test_greedy_tokens_equal_generate_on_each_prompt_alone(model_type):
    ssm = model_type.startswith("ssm:")
    model = build_ssm(model_type[4:]) if ssm else build_hybrid(model_type)
    seqs = _prompts(ssm_prompts if ssm else random_prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad)
    got = generate_with_backends(model, seqs, token_budget=16, **kwargs)
    assert tokens(got.results) == alone(model, seqs, **kwargs)
    stats = got.stats
    assert max(stats.prompt_tokens) <= 16  # the 40-token prompt ran in chunks, continuing its own state
    if model_type not in NO_SHARING:
        assert stats.prefix_regions >= 2 and stats.shared_prefix_tokens > 0


def test_seeded_samples_of_one_prompt_start_from_a_copy_of_its_state():
    model = build_hybrid("qwen3_5_text")
    seqs = _prompts(random_prompts)[:4]
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.3, top_k=50, pad_token_id=0)
    got = generate_with_backends(model, seqs, num_return_sequences=3, seed=11, **kwargs)
    assert got.stats.prefix_regions == len(seqs)  # each prompt prefilled once for its three samples
    repeated = [s for s in seqs for _ in range(3)]
    assert tokens(got.results) == alone(model, repeated, seed=11, **kwargs)
    one_by_one = prepack.generate(model, seqs, num_return_sequences=3, seed=11, max_batch=1, **kwargs)
    assert tokens(one_by_one) == tokens(got.results)


def test_running_requests_decode_in_one_call_of_each_mixer(monkeypatch):
    model = build_hybrid("lfm2")
    mixer = type(model.model.layers[0].conv)
    calls = []
    original = mixer.forward

    def counted(self, hidden_states, *args, **kwargs):
        calls.append((self.layer_idx, hidden_states.shape[0]))
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(mixer, "forward", counted)
    seqs = [torch.tensor(s) for s in random_prompts([4, 6, 3, 5], seed=3)]
    got = prepack.generate(model, seqs, max_new_tokens=5, do_sample=False, pad_token_id=0, share_prefixes=False)
    monkeypatch.setattr(mixer, "forward", original)
    assert tokens(got) == alone(model, seqs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    layer0 = [batch for layer, batch in calls if layer == 0]
    assert layer0 == [1, 1, 1, 1] + [4] * 4  # each prompt from zero state, then four batched decode steps


def test_a_requests_states_are_freed_with_its_keys():
    model = build_hybrid("qwen3_5_text")
    store = KVStore("cpu")
    store.states = HeldStates(model.config, store.prefix_of)
    store.states.cache_of(-1)
    store.attach(0, -1)
    store.states.cache_of(0)  # a copy of the region's states
    assert store.states.held[0] is not store.states.held[-1]
    assert store.free(0) == [0, -1] and store.states.held == {}


def test_a_peft_wrapped_hybrid_decodes_what_its_own_generate_gives():
    from peft import LoraConfig, get_peft_model

    model = build_hybrid("qwen3_5_text")
    lora = LoraConfig(r=4, target_modules=["q_proj", "in_proj_qkv"], init_lora_weights=False)  # attention and a mixer
    peft = get_peft_model(model, lora).eval()
    seqs = [torch.tensor(s) for s in random_prompts([5, 40, 9])]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = prepack.generate(peft, seqs, token_budget=16, **kwargs)
    for s, g in zip(seqs, got, strict=True):
        assert g.tokens.tolist() == peft.generate(input_ids=s[None], **kwargs)[0, len(s):].tolist()
