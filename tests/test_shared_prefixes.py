"""Shared prefixes run once and long prompts run in chunks: every request still gets what it gets alone."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig, MistralForCausalLM

import prepack
from prepack import oracle

from .models import COMMON, WINDOW, build, prompts
from .test_rope import build as rope_model

SYSTEM = 40  # tokens of the shared system prompt: above prefix_regions.MIN_SHARED_TOKENS
TOL = 1e-4


def chats(seed: int = 0) -> list[torch.Tensor]:
    """A system prompt shared by several chats, one request with nothing shared, the prompt plus one
    token, two identical requests and the bare prompt."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 128, (SYSTEM,), generator=g)
    turns = [torch.cat([system, torch.randint(3, 128, (n,), generator=g)]) for n in (5, 17, 9)]
    one_more = torch.cat([system, torch.tensor([7])])
    return turns + [torch.randint(3, 128, (13,), generator=g), one_more, one_more.clone(), system.clone()]


def assert_matches_alone(model, seqs, result):
    logits, caches = oracle.alone(model, seqs)
    assert (result.logits - logits).abs().max() <= TOL
    for mine, theirs in zip(result.dynamic_caches, caches, strict=True):
        assert oracle.cache_gap(mine, theirs) <= TOL


def test_a_sliding_window_model_runs_each_prompt_whole_and_matches_each_request_alone():
    """A merged prefix part would see keys outside the window (prefix_regions.sharing_refusal): nothing is shared."""
    model, seqs = build("mistral"), chats()
    result = prepack.prefill(model, seqs)
    assert result.shared_tokens == 0 and result.tokens_run == sum(len(s) for s in seqs)
    assert_matches_alone(model, seqs, result)


def full_forward(model, seqs, output="logits"):
    with torch.no_grad():
        if output == "logits":
            return [model(s[None]).logits[0] for s in seqs]
        return [model.model(s[None]).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])  # full, MLA (cache != attention keys)
def test_prefill_shares_a_system_prompt_and_matches_each_request_alone(arch):
    model, seqs = build(arch), chats()
    result = prepack.prefill(model, seqs)
    assert result.shared_tokens > 0
    assert result.tokens_run + result.shared_tokens == sum(len(s) for s in seqs)
    assert_matches_alone(model, seqs, result)


def test_prefill_without_sharing_runs_every_token_and_gives_the_same_results():
    model, seqs = build("llama"), chats()
    shared, whole = prepack.prefill(model, seqs), prepack.prefill(model, seqs, share_prefixes=False)
    assert whole.shared_tokens == 0 and whole.tokens_run == sum(len(s) for s in seqs)
    assert (shared.logits - whole.logits).abs().max() <= TOL
    for a, b in zip(shared.dynamic_caches, whole.dynamic_caches, strict=True):
        assert oracle.cache_gap(a, b) <= TOL


def test_left_padded_and_flash_caches_of_shared_requests_hold_each_prompt():
    model, seqs = build("llama"), chats()
    result = prepack.prefill(model, seqs)
    cache, mask = result.left_padded_cache()
    kv = result.flash_kvcache()
    for i, alone in enumerate(result.dynamic_caches):
        n = len(seqs[i])
        torch.testing.assert_close(cache.layers[1].keys[i, :, -n:], alone.layers[1].keys[0])
        torch.testing.assert_close(kv.k_caches[1][i, :n], alone.layers[1].keys[0].transpose(0, 1))
        assert int(mask[i].sum()) == n


@pytest.mark.parametrize("positions", ["last", "all", "spans"])
def test_forward_at_with_a_shared_prefix_matches_each_request_alone(positions):
    model, seqs = build("mistral"), chats()
    full = full_forward(model, seqs)
    if positions == "spans":  # one span inside the prefix, one across its end, one after it, one empty
        spans = [(3, 30), (35, 45), (SYSTEM + 1, SYSTEM + 4), (2, 2), (0, 1), (40, 41), (10, 20)]
        got = prepack.forward_at(model, seqs, spans)
        want = [f[s:e] for f, (s, e) in zip(full, spans, strict=True)]
    elif positions == "all":
        got, want = prepack.forward_at(model, seqs, "all"), full
    else:
        got, want = list(prepack.forward_at(model, seqs)), [f[-1:][0] for f in full]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and (g.numel() == 0 or (g - w).abs().max() <= TOL)


def test_forward_at_reduce_sees_each_requests_own_rows_after_a_shared_prefix():
    model, seqs = build("llama"), chats()
    spans = [(max(len(s) - 3, 0), len(s)) for s in seqs]  # the last 3 tokens: the first 38 of the prompt are shared
    seen = []

    def reduce(values, rows):
        seen.append(rows)
        return values[:, :1] + rows[:, None].to(values)

    got = prepack.forward_at(model, seqs, spans, reduce=reduce)
    first = np.cumsum([0] + [e - s for s, e in spans])[:-1]
    want = [f[s:e, :1] + torch.arange(k, k + e - s)[:, None] for f, (s, e), k in zip(full_forward(model, seqs), spans, first, strict=True)]
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) <= TOL
    assert sorted(torch.cat(seen).tolist()) == list(range(sum(e - s for s, e in spans)))


def test_classify_and_embed_with_a_shared_prefix_match_each_request_alone():
    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=3, pad_token_id=0)).eval()
    seqs = chats()
    with torch.no_grad():
        want = torch.stack([classifier(s[None]).logits[0] for s in seqs])
    assert (prepack.classify(classifier, seqs) - want).abs().max() <= TOL
    model = build("llama")
    hidden = full_forward(model, seqs, "hidden_states")
    for pooling, want in (("mean", torch.stack([h.mean(0) for h in hidden])), ("last", torch.stack([h[-1] for h in hidden]))):
        assert (prepack.embed(model, seqs, pooling=pooling) - want).abs().max() <= TOL


def test_score_shares_a_few_shot_header_between_different_questions():
    model = build("llama")
    g = torch.Generator().manual_seed(3)
    header = torch.randint(3, 128, (SYSTEM,), generator=g).tolist()
    requests = [(header + torch.randint(3, 128, (n,), generator=g).tolist(), torch.randint(3, 128, (3,), generator=g).tolist()) for n in (4, 9, 1)]
    got = prepack.score(model, requests)
    with torch.no_grad():
        for (ctx, cont), (lp, greedy) in zip(requests, got, strict=True):
            logits = model(torch.tensor(ctx + cont[:-1])[None]).logits[0, len(ctx) - 1 :]
            logp = torch.log_softmax(logits, -1)[torch.arange(len(cont)), torch.tensor(cont)]
            assert abs(float(logp.sum()) - lp) <= TOL
            assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    whole = prepack.score(model, requests, share_prefixes=False)
    assert [g.is_greedy for g in got] == [w.is_greedy for w in whole]
    assert [g.logprob for g in got] == pytest.approx([w.logprob for w in whole], abs=TOL)


def long_llama(max_positions: int = 512):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, "max_position_embeddings": max_positions})).eval()


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks_exactly():
    model, seqs = long_llama(), prompts([300, 70, 10])
    result = prepack.prefill(model, seqs, token_budget=64)
    assert result.tokens_run == 380 and result.shared_tokens == 0
    assert len(result.chunks) >= 5  # 300 tokens in 64-token forwards
    assert all(k.shape[2] <= 64 for chunk in result.chunks for k, _ in chunk)
    assert_matches_alone(model, seqs, result)


def test_chunks_continue_a_sliding_window_exactly():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=WINDOW)).eval()
    seqs = prompts([200, 33])
    assert_matches_alone(model, seqs, prepack.prefill(model, seqs, token_budget=16))


def test_a_shared_prefix_longer_than_the_token_budget_runs_in_chunks_once():
    model, seqs = build("llama"), chats()
    result = prepack.prefill(model, seqs, token_budget=16)
    assert result.shared_tokens > 0
    assert_matches_alone(model, seqs, result)


def test_chunked_prompt_longer_than_max_position_embeddings_is_still_rejected():
    with pytest.raises(ValueError, match="request 0 has 300 tokens but the model's max_position_embeddings is 256"):
        prepack.prefill(build("llama"), [[5] * 300], token_budget=64)


def test_length_dependent_rope_shares_no_prefix_and_stays_exact():
    model = rope_model("phi3", "longrope")  # frequencies switch at 16 tokens
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 128, (SYSTEM,), generator=g)
    seqs = [torch.cat([system, torch.randint(3, 128, (n,), generator=g)]) for n in (3, 8)]
    result = prepack.prefill(model, seqs)
    assert result.shared_tokens == 0
    assert (result.logits - oracle.alone_last_logits(model, seqs)).abs().max() <= TOL


def test_chunks_that_would_change_length_dependent_rope_are_refused():
    model = rope_model("phi3", "longrope")
    with pytest.raises(ValueError, match="request 0 has 40 tokens but token_budget is 8.*other rotary frequencies"):
        prepack.prefill(model, prompts([40]), token_budget=8)
    seqs = prompts([14])  # every chunk within the original length: the same frequencies, chunked exactly
    result = prepack.prefill(model, seqs, token_budget=8)
    assert (result.logits - oracle.alone_last_logits(model, seqs)).abs().max() <= TOL


def test_the_row_backend_shares_nothing_and_stays_exact():
    model, seqs = build("llama"), chats()
    result = prepack.prefill(model, seqs, backend="sdpa_masked")
    assert result.shared_tokens == 0
    assert_matches_alone(model, seqs, result)


def test_share_prefixes_must_be_a_bool():
    with pytest.raises(TypeError, match="share_prefixes must be True or False"):
        prepack.prefill(build("llama"), chats(), share_prefixes="yes")
