"""State-space and hybrid state-space models packed exactly: every request as its prompt alone.

Oracles: the plain model on each prompt alone (logits at every position), ``model.generate`` on the
prompt alone against ``model.generate`` continuing the request's prefill cache (the model's own
``DynamicCache``: conv and SSM states plus attention keys), and the mixers' own forward per segment.
"""

import copy

import numpy as np
import pytest
import torch

import prepack
from prepack import mixers
from prepack.mixers import active, mamba
from prepack.oracle import cache_gap

from .conftest import gpu
from .ssm_models import MAMBA1_TYPES, SSM_TYPES, build_ssm, random_prompts

TOL = 1e-4
LENGTHS = [5, 17, 1, 12, 9]


def _alone(model, seq) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq]), use_cache=False).logits[0]


@pytest.mark.parametrize("model_type", SSM_TYPES)
def test_forward_at_prefill_and_continued_caches_match_each_prompt_alone(model_type):
    model, seqs = build_ssm(model_type), random_prompts(LENGTHS)
    want = [_alone(model, s) for s in seqs]
    got = prepack.forward_at(model, seqs, positions=[(0, len(s)) for s in seqs])
    for i in range(len(seqs)):
        assert (got[i] - want[i]).abs().max() <= TOL, f"{model_type} request {i}: forward_at"
    result = prepack.prefill(model, seqs)
    for i, (seq, cache) in enumerate(zip(seqs, result.dynamic_caches, strict=True)):
        assert (result.logits[i] - want[i][-1]).abs().max() <= TOL, f"{model_type} request {i}: prefill logits"
        with torch.no_grad():
            own = model(torch.tensor([seq]), use_cache=True).cache  # the cache the model leaves for the prompt alone
        assert type(cache) is type(own)
        assert cache_gap(cache, own) <= TOL, f"{model_type} request {i}: final states"
        first = int(result.logits[i].argmax())
        alone = model.generate(torch.tensor([seq]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(seq):]
        continued = model.generate(torch.tensor([seq + [first]]), cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert continued[0, len(seq):].tolist() == alone.tolist(), f"{model_type} request {i}: continued cache"


@pytest.mark.parametrize("model_type", ["mamba2", "bamba"])
def test_a_prefill_only_job_runs_each_mamba2_mixer_once_per_forward(model_type):
    """The one-call path (prepack's conv and scan on transformers' hooks), not one mixer call per prompt."""
    model, seqs = build_ssm(model_type), random_prompts(LENGTHS, seed=1)
    calls = []
    found = [m for _, m, kind in mixers.mixer_modules(model) if kind is mamba.MAMBA2]
    handles = [m.in_proj.register_forward_hook(lambda *_: calls.append(1)) for m in found]
    try:
        got = prepack.forward_at(model, seqs)
    finally:
        for h in handles:
            h.remove()
    assert all(mamba.installed(m) for m in found)
    assert len(calls) == len(found), f"{len(calls)} in_proj calls for {len(found)} mixers"
    for i, seq in enumerate(seqs):
        assert (got[i] - _alone(model, seq)[-1]).abs().max() <= TOL, f"request {i}"


def test_score_with_a_shared_context_matches_each_pair_alone():
    model = build_ssm("granitemoehybrid")
    ctx, other = random_prompts([12, 7], seed=3)
    conts = random_prompts([3, 1, 4], seed=4)
    pairs = [(ctx, conts[0]), (ctx, conts[1]), (other, conts[2])]
    got = prepack.score(model, pairs)
    for i, (c, t) in enumerate(pairs):
        logits = _alone(model, c + t[:-1])[len(c) - 1:]
        want = torch.log_softmax(logits.double(), -1)[torch.arange(len(t)), torch.tensor(t)].sum().item()
        assert abs(got[i].logprob - want) <= 1e-4, f"pair {i}"


@pytest.mark.parametrize("model_type", MAMBA1_TYPES)
def test_mamba1_gets_the_packed_call_from_the_model_above_and_plain_calls_stay_plain(model_type):
    """Mamba's blocks pass their mixer no keyword: the call reaches it through prepack.mixers.active's hooks, which
    are installed once, are gone after each call (also one that raises), and leave plain calls the model's own."""
    model, seqs = build_ssm(model_type), random_prompts([3, 4], seed=5)
    prepack.forward_at(model, seqs)
    hooks = len(model._forward_pre_hooks), len(model._forward_hooks)
    assert hooks == (1, 1)
    prepack.forward_at(model, seqs)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks, "hooks installed again"
    twin = copy.deepcopy(model)  # carries the hooks: not hooked twice
    prepack.forward_at(twin, seqs)
    assert (len(twin._forward_pre_hooks), len(twin._forward_hooks)) == hooks
    assert active.active_call() is None
    with torch.no_grad():
        plain = model(torch.tensor([seqs[1]]), use_cache=False).logits[0, -1]
        first = model(torch.tensor([seqs[0] + seqs[1]]), use_cache=False).logits[0, -1]
    assert (plain - first).abs().max() > 1e-3, "a plain call of two prompts back to back must carry state across them"
    from prepack.executor.call import PackedCall, StepLayout
    from prepack.attention.registry import choose

    wrong = PackedCall(StepLayout(np.array([3, 3]), np.array([3, 3]), torch.device("cpu")), choose("auto", device=torch.device("cpu")))
    with pytest.raises(prepack.UnsupportedModelError, match="stream for segments of 6 tokens"):
        with torch.no_grad():
            model(torch.tensor([seqs[1]]), prepack=wrong, use_cache=False)
    assert active.active_call() is None, "the call stayed active after its forward raised"


@pytest.mark.parametrize("model_type", MAMBA1_TYPES)
def test_mamba1_padding_free_training_batch_is_refused(model_type):
    """transformers' cu_seq_lens_q never reaches Mamba's mixers: refused, not run across the sequences."""
    from transformers import DataCollatorWithFlattening

    model = prepack.enable(build_ssm(model_type).train())
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in random_prompts([4, 6])])
    with pytest.raises(prepack.UnsupportedModelError, match="passes no keyword on to its mixers.*cu_seq_lens_q"):
        model(**batch, use_cache=False)
    with pytest.raises(prepack.UnsupportedModelError, match="restarting position_ids"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad():  # a padded batch, and one sequence with its own positions, are the model's own
        model.eval()(input_ids=batch["input_ids"], position_ids=torch.arange(10)[None], use_cache=False)
        model(input_ids=batch["input_ids"][:, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), use_cache=False)


@pytest.mark.parametrize("model_type", ["mamba2", "bamba"])
def test_padding_free_training_batch_gives_the_padded_batch_loss_and_grads(model_type):
    """transformers' DataCollatorWithFlattening batch through the one-call path (train mode: the fused kernel's hook
    declines, the conv and SSD scan hooks keep the sequences apart) against the right-padded batch."""
    from transformers import DataCollatorWithFlattening

    seqs = random_prompts([7, 12, 4], seed=11)
    padded = build_ssm(model_type).train()
    packed = prepack.enable(build_ssm(model_type).train())
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    loss_padded = padded(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    loss_packed = packed(**batch, use_cache=False).loss
    assert abs(loss_packed.item() - loss_padded.item()) <= TOL
    loss_padded.backward()
    loss_packed.backward()
    for (name, p), q in zip(padded.named_parameters(), packed.parameters(), strict=True):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-4, name


@gpu
@pytest.mark.parametrize("model_type", ["mamba2", "granitemoehybrid"])
def test_forward_at_on_cuda_matches_each_prompt_alone(model_type):
    """On CUDA the hooks call causal-conv1d / mamba-ssm where they import, else the same exact torch scans."""
    model, seqs = build_ssm(model_type).to("cuda"), random_prompts(LENGTHS, seed=12)
    got = prepack.forward_at(model, seqs, positions=[(0, len(s)) for s in seqs])
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            want = model(torch.tensor([seq], device="cuda"), use_cache=False).logits[0]
        assert (got[i] - want).abs().max() <= 1e-3, f"request {i}"


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("rwkv", r"recurrent \(state-space / linear-attention\) layers \(rwkv\.blocks\.0\.attention\.time_decay"),
        ("xlstm", r"recurrent \(xLSTM\) layers \(backbone\.blocks\.0\.mlstm_layer"),
        ("recurrent_gemma", r"a convolution over tokens \(model\.layers\.0\.temporal_block\.conv_1d"),
    ],
)
def test_recurrent_models_prepack_does_not_pack_are_refused_for_their_recurrence(model_type, reason):
    """Refused before anything runs, naming the recurrent module, not for a side issue (attention routing)."""
    with pytest.raises(prepack.UnsupportedModelError, match="cannot be packed exactly: it has " + reason):
        prepack.forward_at(build_ssm(model_type), random_prompts([3, 4]))
