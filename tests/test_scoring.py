"""prepack.score / score_rolling: lm-eval's loglikelihood semantics, packed, against lm-eval's own hf model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack

from .models import build, prompts

lm_eval_oracle = pytest.importorskip("tests.lm_eval_oracle")


def multiple_choice(seed: int = 0):
    """(context, continuation) requests: 3 questions x 4 choices of 1 to 5 tokens, and 2 lone requests."""
    g = torch.Generator().manual_seed(seed)
    contexts = prompts([9, 23, 2, 14, 31], seed=seed)
    out = []
    for i, c in enumerate(contexts):
        for _ in range(4 if i < 3 else 1):
            n = int(torch.randint(1, 6, (1,), generator=g))
            out.append((c.tolist(), torch.randint(3, 128, (n,), generator=g).tolist()))
    return out


def lm_eval_loglikelihoods(model, requests, **kwargs):
    lm = lm_eval_oracle.hflm(model, **kwargs)
    return lm._loglikelihood_tokens([(None, c, t) for c, t in requests], disable_tqdm=True)


def assert_same_scores(mine, theirs):
    assert len(mine) == len(theirs) > 0
    assert max(abs(a[0] - b[0]) for a, b in zip(mine, theirs, strict=True)) <= 1e-4
    assert [a[1] for a in mine] == [b[1] for b in theirs]


def greedy_continuation(model, context, n):
    ids = torch.tensor(context)
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax()[None]])
    return ids[len(context):].tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("share_contexts", [True, False])
def test_score_matches_lm_eval_hf_loglikelihood(arch, share_contexts):
    model, requests = build(arch), multiple_choice()
    mine = prepack.score(model, requests, share_contexts=share_contexts)
    assert_same_scores(mine, lm_eval_loglikelihoods(model, requests))


def test_shared_contexts_match_lm_eval_within_a_small_token_budget():
    model, requests = build("mistral"), multiple_choice(seed=3)
    mine = prepack.score(model, requests, token_budget=40)
    assert_same_scores(mine, lm_eval_loglikelihoods(model, requests))


def test_the_greedy_continuation_is_reported_greedy():
    model = build("llama")
    context = prompts([7], seed=4)[0].tolist()
    greedy = greedy_continuation(model, context, 4)
    other = greedy[:3] + [(greedy[3] + 1) % 128 or 3]
    requests = [(context, greedy), (context, other), (context, greedy[:1])]
    mine = prepack.score(model, requests)
    assert [s.is_greedy for s in mine] == [True, False, True]
    assert_same_scores(mine, lm_eval_loglikelihoods(model, requests))


def test_a_shared_context_runs_once():
    model, requests = build("llama"), multiple_choice()
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    prepack.score(model, requests)
    hook.remove()
    contexts = {tuple(c) for c, _ in requests}
    assert sum(seen) == sum(len(c) for c in contexts) + sum(len(t) - 1 for _, t in requests)


def test_left_truncation_matches_lm_eval_when_asked_for():
    model = build("llama")
    requests = [(prompts([40])[0].tolist(), [5, 6, 7]), ([4, 5], [6, 7])]
    mine = prepack.score(model, requests, max_length=20, truncate="left")
    assert_same_scores(mine, lm_eval_loglikelihoods(model, requests, max_length=20))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 12), st.data())
def test_rolling_windows_are_lm_evals(n, max_seq_len, data):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    context_len = data.draw(st.integers(1, max_seq_len))
    tokens = list(range(10, 10 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, max_seq_len, context_len)]
    assert prepack.rolling_windows(tokens, 1, max_seq_len, context_len) == [(list(a), list(b)) for a, b in theirs]


def test_score_rolling_matches_lm_eval_hf_loglikelihood_rolling():
    model = build("qwen2")
    documents = [d.tolist() for d in prompts([50, 3, 17, 1], seed=2)] + [[]]
    lm = lm_eval_oracle.hflm(model, max_length=16)
    theirs = lm.loglikelihood_rolling(lm_eval_oracle.rolling_instances(documents), disable_tqdm=True)
    mine = prepack.score_rolling(model, documents, prefix_token_id=lm.prefix_token_id, max_length=16)
    assert np.abs(np.array(mine) - np.array(theirs)).max() <= 1e-4


def test_score_rolling_on_the_row_backend_matches_lm_eval_hf_loglikelihood_rolling():
    # every document's first window is conditioned on the prefix token alone: a context the rows cannot share
    model = build("llama")
    documents = [d.tolist() for d in prompts([30, 3, 17, 5], seed=5)]
    lm = lm_eval_oracle.hflm(model, max_length=16)
    theirs = lm.loglikelihood_rolling(lm_eval_oracle.rolling_instances(documents), disable_tqdm=True)
    mine = prepack.score_rolling(model, documents, prefix_token_id=lm.prefix_token_id, max_length=16, backend="sdpa_masked")
    assert len(mine) == len(theirs) == 4
    assert np.abs(np.array(mine) - np.array(theirs)).max() <= 1e-4


def test_sharing_contexts_on_the_row_backend_is_refused_before_anything_runs():
    model = build("llama")
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    with pytest.raises(ValueError, match=r"requests 1 and 2 share a context.*not 'sdpa_masked'; pass share_contexts=False"):
        prepack.score(model, [([1, 2], [3]), ([4, 5], [6]), ([4, 5], [7])], backend="sdpa_masked")
    hook.remove()
    assert seen == []


def test_without_shared_contexts_the_row_backend_matches_lm_eval():
    model, requests = build("llama"), multiple_choice(seed=1)
    mine = prepack.score(model, requests, share_contexts=False, backend="sdpa_masked")
    assert_same_scores(mine, lm_eval_loglikelihoods(model, requests))


def test_score_rolling_gives_perplexity_of_a_document_that_fits():
    model = build("llama")
    doc = prompts([12], seed=6)[0]
    (ll,) = prepack.score_rolling(model, [doc], prefix_token_id=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([torch.tensor([1]), doc[:-1]])[None]).logits[0], -1)
    assert abs(ll - float(logp.gather(1, doc[:, None]).sum())) <= 1e-4


def test_an_empty_continuation_is_refused_with_its_index():
    with pytest.raises(ValueError, match="request 1 has an empty continuation"):
        prepack.score(build("llama"), [([1, 2], [3]), ([1, 2], [])])


def test_an_empty_context_is_refused_and_names_the_prefix_token_fix():
    with pytest.raises(ValueError, match=r"request 0 has an empty context.*pass \[bos_token_id\]"):
        prepack.score(build("llama"), [([], [3, 4])])


def test_a_continuation_token_outside_the_vocabulary_is_refused_with_its_index():
    with pytest.raises(ValueError, match="request 1 has continuation token id 130 but the model's vocab_size is 128"):
        prepack.score(build("llama"), [([1, 2], [3]), ([4, 5], [6, 130])])


def test_a_continuation_token_outside_the_vocabulary_is_refused_in_a_shared_context_too():
    with pytest.raises(ValueError, match="request 1 has continuation token id 128 but the model's vocab_size is 128"):
        prepack.score(build("llama"), [([4, 5], [3]), ([4, 5], [128])])


def test_no_requests_give_no_scores():
    model = build("llama")
    assert prepack.score(model, []) == []
    assert prepack.score_rolling(model, [], prefix_token_id=1) == []


def test_a_request_longer_than_the_context_window_is_refused_without_truncate():
    with pytest.raises(ValueError, match="request 1 has 250 context \\+ 10 continuation tokens, 259 model inputs, "
                       "but the context window \\(max_length\\) is 256 \\(pass truncate='left'.*score_rolling"):
        prepack.score(build("llama"), [([1, 2], [3]), ([5] * 250, [6] * 10)])


@pytest.mark.parametrize("share_contexts", [True, False])
def test_requests_and_shared_contexts_longer_than_the_token_budget_run_in_chunks_and_match_lm_eval(share_contexts):
    """Contexts of 9 to 31 tokens (3 of them shared by 4 choices) under a budget of 8: every input is chunked."""
    model, requests = build("llama"), multiple_choice(seed=5)
    mine = prepack.score(model, requests, token_budget=8, share_contexts=share_contexts)
    assert_same_scores(mine, lm_eval_loglikelihoods(model, requests))


def test_a_long_request_that_cannot_be_chunked_is_refused_with_its_own_index_beside_shared_contexts():
    """LongRoPE: a chunk of request 2 would get other rotary frequencies than the whole request. Requests 0 and 1
    share a context (run apart from it), so request 2 is the first of the others: the error still names it 2."""
    from .test_rope import build as build_rope

    requests = [([1, 2], [3]), ([1, 2], [4]), ([5] * 30, [6, 7])]
    with pytest.raises(ValueError, match="request 2 has 31 tokens but token_budget is 8, and LlamaForCausalLM's"):
        prepack.score(build_rope("llama", "longrope"), requests, token_budget=8)


def test_a_request_over_the_token_budget_on_a_row_backend_is_refused_with_its_index():
    """sdpa_masked lays requests out in rows and cannot chunk one; the error names the caller's request 2."""
    requests = [([1, 2], [3]), ([1, 2], [4]), ([5] * 20, [6, 7])]  # 0 and 1 share a context
    with pytest.raises(ValueError, match="request 2 has 21 tokens but token_budget is 16, and backend 'sdpa_masked'"):
        prepack.score(build("llama"), requests, token_budget=16, backend="sdpa_masked", share_contexts=False)


def test_string_pairs_are_encoded_as_lm_eval_encodes_them():
    from prepack.jobs.scoring import encode_pairs

    from .models import tokenizer

    tok, model = tokenizer(), build("llama")
    # trailing context spaces, an empty context (-> the prefix token), and one whose continuation starts with it
    pairs = [("the quick brown", " fox jumps"), ("hello ", "world"), ("a user asks", " a question"), ("", "hello world"),
             ("", "[EOS] hello")]
    theirs = lm_eval_oracle.encoded_pairs(lm_eval_oracle.hflm(model, tokenizer=tok), pairs)
    assert len(theirs) == len(pairs)
    assert encode_pairs(tok, pairs) == theirs
    assert prepack.score(model, pairs, tokenizer=tok) == prepack.score(model, theirs)


def test_string_pairs_without_a_tokenizer_are_refused():
    with pytest.raises(ValueError, match="no tokenizer; pass tokenizer="):
        prepack.score(build("llama"), [("a", "b")])
