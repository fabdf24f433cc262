"""Hybrid models (attention + gated delta-net or short-convolution layers) packed exactly.

Each packed segment's convolution window and recurrent state start from zero, so every request gets what
the plain model gives its prompt alone. Oracles: the plain model on each prompt alone, ``model.generate``
continuing a prefill cache, and the padded training batch's loss and gradients.
"""

import copy

import pytest
import torch
from transformers import DataCollatorWithFlattening

import prepack
from prepack import mixers
from prepack.hf import registration as hf
from prepack.hf.support import UnsupportedModelError

from .hybrid_models import HYBRIDS, build_hybrid, random_prompts

TOL = 1e-4
LENGTHS = [5, 17, 1, 40, 9]


def alone(model, seq) -> torch.Tensor:
    """(L, V) logits of the plain model on ``seq`` alone."""
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_prefill_logits_match_each_prompt_alone(model_type):
    model, seqs = build_hybrid(model_type), random_prompts(LENGTHS)
    got = prepack.prefill(model, seqs).logits
    for i, seq in enumerate(seqs):
        assert (got[i] - alone(model, seq)[-1]).abs().max() <= TOL, f"request {i}"


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm2"])
def test_forward_at_every_position_matches_each_prompt_alone(model_type):
    model, seqs = build_hybrid(model_type), random_prompts(LENGTHS, seed=1)
    got = prepack.forward_at(model, seqs, positions=[(0, len(s)) for s in seqs])
    for i, seq in enumerate(seqs):
        assert (got[i] - alone(model, seq)).abs().max() <= TOL, f"request {i}"


def test_forward_at_in_several_forwards_matches_each_prompt_alone():
    model, seqs = build_hybrid("qwen3_5_text"), random_prompts(LENGTHS, seed=2)
    got = prepack.forward_at(model, seqs, token_budget=45)  # the prompts need three forwards
    for i, seq in enumerate(seqs):
        assert (got[i] - alone(model, seq)[-1]).abs().max() <= TOL, f"request {i}"


def test_score_with_shared_contexts_matches_each_pair_alone():
    model = build_hybrid("qwen3_5_text")
    ctx, other = random_prompts([12, 7], seed=3)
    conts = random_prompts([3, 1, 4], seed=4)
    pairs = [(ctx, conts[0]), (ctx, conts[1]), (other, conts[2])]  # two pairs share a context: run whole here
    got = prepack.score(model, pairs)
    for i, (c, t) in enumerate(pairs):
        logits = alone(model, c + t[:-1])[len(c) - 1:]
        want = torch.log_softmax(logits.double(), -1)[torch.arange(len(t)), torch.tensor(t)].sum().item()
        assert abs(got[i].logprob - want) <= 1e-4, f"pair {i}"
        assert got[i].is_greedy == bool((logits.argmax(-1) == torch.tensor(t)).all())


def test_embed_mean_pooling_matches_each_prompt_alone():
    model, seqs = build_hybrid("lfm2"), random_prompts(LENGTHS, seed=5)
    got = prepack.embed(model, seqs)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            want = model.model(torch.tensor([seq])).last_hidden_state[0].mean(0)
        assert (got[i] - want).abs().max() <= TOL, f"request {i}"


def test_classify_matches_each_prompt_alone():
    from transformers import AutoConfig, Qwen3_5TextForSequenceClassification

    from .hybrid_models import BASE, GDN

    config = AutoConfig.for_model("qwen3_5_text", **{**BASE, **GDN}, num_labels=3)
    torch.manual_seed(0)
    model = Qwen3_5TextForSequenceClassification(config).eval()
    seqs = random_prompts(LENGTHS, seed=6)
    got = prepack.classify(model, seqs)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            want = model(torch.tensor([seq])).logits[0]
        assert (got[i] - want).abs().max() <= TOL, f"request {i}"


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm2", "qwen3_next", "minimax"])
def test_dynamic_caches_continue_like_the_prompt_alone(model_type):
    """Each request's cache is the model's own class (MiniMax's own MiniMaxCache), holding attention keys and conv /
    recurrent states."""
    model, seqs = build_hybrid(model_type), random_prompts([6, 19, 2], seed=7)
    result = prepack.prefill(model, seqs)
    for i, (seq, cache) in enumerate(zip(seqs, result.dynamic_caches, strict=True)):
        first = int(result.logits[i].argmax())
        with torch.no_grad():
            own = model(torch.tensor([seq]), use_cache=True).cache  # the model's own cache for the prompt alone
            assert type(cache) is type(own)
            step = model(torch.tensor([[first]]), cache=copy.deepcopy(cache)).logits[0, -1]
            # the step from the model's own cache: MiniMax's one-token path differs from its block path by ~1e-4 itself
            want_step = model(torch.tensor([[first]]), cache=own).logits[0, -1]
        assert (step - want_step).abs().max() <= TOL, f"request {i}"
        if model_type != "minimax":
            assert (step - alone(model, seq + [first])[-1]).abs().max() <= TOL, f"request {i}"
        want = model.generate(torch.tensor([seq]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(seq):]
        got = model.generate(torch.tensor([seq + [first]]), cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert got[0, len(seq):].tolist() == want.tolist(), f"request {i}"


def test_shared_prefixes_run_whole_and_stay_exact():
    model = build_hybrid("qwen3_5_text")
    head = random_prompts([40], seed=8)[0]
    seqs = [head + tail for tail in random_prompts([3, 5, 2], seed=9)]
    result = prepack.prefill(model, seqs)
    assert result.shared_tokens == 0 and result.tokens_run == sum(map(len, seqs))
    for i, seq in enumerate(seqs):
        assert (result.logits[i] - alone(model, seq)[-1]).abs().max() <= TOL, f"request {i}"


def test_a_prompt_longer_than_the_token_budget_is_refused_with_the_reason():
    model = build_hybrid("lfm2")
    with pytest.raises(UnsupportedModelError, match=r"request 1 has 40 tokens but token_budget is 16.*short_conv.*conv state"):
        prepack.prefill(model, random_prompts([5, 40]), token_budget=16)


def test_row_backend_is_refused_for_mixers():
    with pytest.raises(UnsupportedModelError, match="sdpa_masked.*varlen backend"):
        prepack.prefill(build_hybrid("lfm2"), random_prompts([4, 6]), backend="sdpa_masked")


def test_a_mixer_without_the_layout_inside_an_entry_point_is_refused():
    model = build_hybrid("lfm2")
    prepack.enable(model)
    with hf.switched(model), pytest.raises(UnsupportedModelError, match="without prepack's packed layout"):
        model(torch.tensor([[5, 6, 7]]))


def test_plain_calls_are_unchanged_by_the_installed_wrapper():
    model, seq = build_hybrid("qwen3_5_text"), random_prompts([12], seed=10)[0]
    before = alone(model, seq)
    prepack.prefill(model, [seq])
    wrapped = [m for _, m, _ in mixers.mixer_modules(model)]
    assert wrapped and all(mixers.installed(m) for m in wrapped)
    assert mixers.install(model) == len(wrapped)  # idempotent
    assert torch.equal(alone(model, seq), before)
    twin = copy.deepcopy(model)  # the wrapper follows the copy, not the original
    assert torch.equal(alone(twin, seq), before)


def flattened(seqs, **kwargs) -> dict:
    return DataCollatorWithFlattening(**kwargs)([{"input_ids": s} for s in seqs])


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm2", "minimax"])
def test_padding_free_training_batch_gives_the_padded_batch_loss_and_grads(model_type):
    seqs = random_prompts([7, 12, 4], seed=11)
    padded = build_hybrid(model_type).train()
    packed = prepack.enable(build_hybrid(model_type).train())
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    loss_padded = padded(input_ids=ids, attention_mask=mask, labels=labels).loss
    batch = flattened(seqs, return_flash_attn_kwargs=True)
    loss_packed = packed(**batch).loss
    assert abs(loss_packed.item() - loss_padded.item()) <= TOL
    loss_padded.backward()
    loss_packed.backward()
    for (name, p), q in zip(padded.named_parameters(), packed.parameters(), strict=True):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-4, name


def test_position_ids_only_training_batch_is_refused():
    model = prepack.enable(build_hybrid("qwen3_5_text"))
    batch = flattened(random_prompts([5, 6], seed=12))
    with pytest.raises(UnsupportedModelError, match="return_flash_attn_kwargs=True"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm3", "minimax"])
def test_dynamic_caches_equal_the_models_own_cache_alone(model_type):
    from prepack import oracle

    model, seqs = build_hybrid(model_type), [torch.tensor(s) for s in random_prompts([7, 23, 2], seed=13)]
    _, theirs = oracle.alone(model, seqs)
    mine = prepack.prefill(model, seqs).dynamic_caches
    assert all(oracle.cache_gap(a, b) <= TOL for a, b in zip(mine, theirs, strict=True))
    other = prepack.prefill(model, [seqs[1]]).dynamic_caches[0]
    assert oracle.cache_gap(other, theirs[0]) == float("inf")  # another prompt's states and keys do not pass
