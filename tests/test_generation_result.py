"""prepack.generate and generate_iter return one type, prepack.Generation, in every mode.

Each result carries its request's numbers (prompt, sample), tokens, text when a tokenizer is known,
log-probabilities when asked, and the finish reason (mapped to vLLM's). The forms generate returned
before (a bare token tensor, ``decode=True`` strings) keep working for one release, with a
``DeprecationWarning`` naming the replacement, and no old use silently reads something else.
"""

import numpy as np
import pytest
import torch

import prepack

from .models import build, prompts, tokenizer

GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def model():
    return build("llama")


def alone(model, seq, **kwargs) -> list[int]:
    with torch.no_grad():
        return model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), **kwargs)[0, len(seq):].tolist()


def test_each_result_says_its_prompt_and_sample_in_prompt_major_order(model):
    seqs = prompts([3, 5])
    out = prepack.generate(model, seqs, num_return_sequences=3, do_sample=True, top_k=1, max_new_tokens=4, pad_token_id=0)
    assert all(isinstance(g, prepack.Generation) for g in out)
    assert [(g.index, g.prompt, g.sample) for g in out] == [(i * 3 + s, i, s) for i in range(2) for s in range(3)]
    for g in out:  # top_k=1 sampling is greedy: every sample is the prompt's greedy continuation
        assert g.tokens.tolist() == alone(model, seqs[g.prompt], **GREEDY)


def test_text_and_logprobs_come_together_in_one_result(model, tok):
    out = prepack.generate(model, ["hello world", "the quick brown fox"], tokenizer=tok, return_logprobs=True, **GREEDY)
    for g in out:
        assert g.text == tok.decode(g.tokens, skip_special_tokens=True)
        assert g.logprobs.shape == g.tokens.shape and bool((g.logprobs <= 0).all())


def test_without_a_tokenizer_or_return_logprobs_those_fields_are_none(model):
    g = prepack.generate(model, prompts([4]), **GREEDY)[0]
    assert g.text is None and g.logprobs is None


def test_completion_order_results_carry_their_prompt(model):
    seqs = prompts([4, 4, 4])
    done = list(prepack.generate_iter(model, seqs, order="completion", max_new_tokens=[6, 2, 4], do_sample=False, pad_token_id=0))
    assert [g.prompt for g in done] == [1, 2, 0]
    for g in done:
        assert g.tokens.tolist() == alone(model, seqs[g.prompt], max_new_tokens=[6, 2, 4][g.prompt], do_sample=False, pad_token_id=0)


def test_finish_reasons_and_their_vllm_names(model):
    seqs = prompts([4, 4])
    first = alone(model, seqs[0], **GREEDY)[0]  # make request 0's first token its EOS
    out = prepack.generate(model, seqs, eos_token_id=first, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0].finish_reason == "eos" and out[0].tokens.tolist() == [first]
    other = out[1].tokens.tolist()
    assert out[1].finish_reason == ("eos" if other[-1] == first else "length")
    assert out[1].finish_reason == "eos" or len(other) == 4
    assert prepack.VLLM_FINISH_REASON == {"eos": "stop", "stop": "stop", "length": "length"}


# ---------------------------------------------------------------- the forms of the previous release


def test_tensor_uses_of_a_result_read_its_tokens_with_a_deprecation_warning(model):
    g = prepack.generate(model, prompts([4]), **GREEDY)[0]
    t = g.tokens
    with pytest.deprecated_call(match="read .tokens"):
        assert torch.equal(g, t)
    with pytest.deprecated_call(match="read .tokens"):
        assert g.tolist() == t.tolist()
    with pytest.deprecated_call(match="read .tokens"):
        assert len(g) == len(t)
    with pytest.deprecated_call(match="read .tokens"):
        assert g[:2].tolist() == t[:2].tolist()
    with pytest.deprecated_call(match="read .tokens"):
        assert np.asarray(g).tolist() == t.tolist()
    with pytest.deprecated_call(match="read .tokens"):
        assert torch.stack([g, g]).tolist() == [t.tolist()] * 2


def test_decode_true_still_returns_strings_with_a_deprecation_warning(model, tok):
    texts = ["hello world", "the quick brown fox"]
    with pytest.deprecated_call(match=r"decode=True\) is deprecated.*\.text"):
        old = prepack.generate(model, texts, tokenizer=tok, decode=True, **GREEDY)
    assert old == [g.text for g in prepack.generate(model, texts, tokenizer=tok, **GREEDY)]


def test_a_result_never_unpacks_as_the_old_logprobs_tuple(model):
    # before, return_logprobs gave NamedTuples (index, tokens, logprobs, finish_reason): reading one by position
    # must fail loudly, not hand back a token
    g = prepack.generate(model, prompts([4]), return_logprobs=True, **GREEDY)[0]
    with pytest.raises(TypeError, match="not iterable: read .tokens"):
        index, tokens, logprobs, reason = g
    with pytest.raises(TypeError, match="read its fields"):
        g[1]
    assert (g.index, g.finish_reason) == (0, "length")  # the old attribute names read the same values
