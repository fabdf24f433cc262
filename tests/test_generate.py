"""prepack.generate: every request gets what model.generate gives its prompt alone."""

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

import prepack
from prepack.jobs.generation import generate_with_backends
from prepack.executor.kvstore import KVStore

from .models import ARCHITECTURES, build, prompts

MIXED = [1, 5, 17, 3, 30, 12]


def alone(model, seqs, *, seed=None, **kwargs) -> list[list[int]]:
    """The oracle: model.generate on each prompt by itself (no padding, no neighbours), new tokens only."""
    rows = []
    for i, s in enumerate(seqs):
        if seed is not None:
            torch.manual_seed(seed + i)
        with torch.no_grad():
            out = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kwargs)
        rows.append(out[0, len(s):].tolist())
    return rows


def tokens(results) -> list[list[int]]:
    return [r.tokens.tolist() for r in results]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_equal_generate_on_each_prompt_alone(arch):
    model, seqs = build(arch), prompts(MIXED)
    got = prepack.generate(model, seqs, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert tokens(got) == alone(model, seqs, max_new_tokens=12, do_sample=False, pad_token_id=0)


def test_more_prompts_than_the_kv_budget_holds_are_admitted_as_others_finish():
    model, seqs = build("mistral"), prompts(MIXED * 2)
    got = generate_with_backends(model, seqs, kv_budget=64, max_new_tokens=10, do_sample=False, pad_token_id=0)
    stats = got.stats
    assert tokens(got.results) == alone(model, seqs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert max(stats.batch_sizes) < len(seqs)  # never all at once ...
    assert stats.peak_live_tokens <= 64  # ... and the cached keys stayed within the budget


def test_a_finished_requests_keys_are_freed_and_their_rows_reused():
    store = KVStore("cpu")
    step = store.plan({0: 5, 1: 3})
    for layer in range(2):
        step.extend(layer, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    size = store.size
    store.free(0)
    assert store.live_tokens() == 3 and 0 not in store.start
    step = store.plan({1: 1, 2: 5})  # a new request fits in what request 0 left
    for layer in range(2):
        step.extend(layer, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    assert store.size == size and store.live_tokens() == 9


def test_each_segment_reads_exactly_its_own_keys_from_the_store():
    store = KVStore("cpu", slack=0)
    first = store.plan({0: 3, 1: 2})
    k = torch.arange(5.0).view(1, 1, 5, 1)
    first.extend(0, k, k)
    step = store.plan({0: 1, 1: 1})  # request 0 outgrows its region and moves above request 1
    keys, _ = step.extend(0, torch.full((1, 1, 2, 1), 9.0), torch.full((1, 1, 2, 1), 9.0))
    cu_q, cu_k = (torch.cumsum(torch.from_numpy(np.r_[0, x]), 0) for x in (step.layout.q_lengths, step.layout.k_lengths))
    seen = {r: keys[0, 0, cu_k[j + 1] - n: cu_k[j + 1], 0].tolist()
            for r, j, n in zip(step.order, np.flatnonzero(step.layout.q_lengths), step.cached + step.q, strict=True)}
    assert seen == {0: [0.0, 1.0, 2.0, 9.0], 1: [3.0, 4.0, 9.0]}


@pytest.mark.parametrize("where", ["kwargs", "generation_config", "model"])
def test_use_cache_false_gives_the_tokens_generate_gives(where):
    model, seqs = build("llama"), prompts(MIXED)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    if where == "kwargs":
        kwargs["use_cache"] = False
    elif where == "generation_config":
        kwargs = {"generation_config": GenerationConfig(**kwargs, use_cache=False)}
    else:
        model.generation_config.use_cache = False
    assert tokens(prepack.generate(model, seqs, **kwargs)) == alone(model, seqs, **kwargs)


def test_eos_as_a_list_stops_each_request_at_its_first_eos():
    model, seqs = build("qwen2"), prompts(MIXED)
    free = alone(model, seqs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = [free[0][2], free[3][1]]
    got = prepack.generate(model, seqs, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos, return_logprobs=True)
    assert [g.tokens.tolist() for g in got] == alone(model, seqs, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert got[0].finish_reason == "eos" and len(got[0].tokens) == 3


class StopAfter(StoppingCriteria):
    """Stops a sequence once it holds ``n`` tokens (prompt included): a length known only per request."""

    def __init__(self, n):
        self.n = n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)


def test_a_stopping_criterion_that_fires_returns_the_tokens_up_to_it_and_no_padding():
    model, seqs = build("llama"), prompts(MIXED)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([StopAfter(14)]))
    got = prepack.generate(model, seqs, return_logprobs=True, **kwargs)
    assert [g.tokens.tolist() for g in got] == alone(model, seqs, **kwargs)
    assert [g.finish_reason for g in got] == ["length", "length", "stop", "length", "stop", "stop"]


@pytest.mark.parametrize("kwargs", [
    {"max_length": 20}, {"min_length": 18, "eos_token_id": 5}, {"min_new_tokens": 4, "eos_token_id": 5},
    {"max_new_tokens": [3, 1, 5, 2, 4, 6]},
])
def test_length_limits_count_each_requests_own_prompt(kwargs):
    model, seqs = build("llama"), prompts(MIXED)
    model.generation_config.eos_token_id = None
    got = prepack.generate(model, seqs, do_sample=False, pad_token_id=0, **{"max_new_tokens": 8, **kwargs})
    if isinstance(kwargs.get("max_new_tokens"), list):
        want = [alone(model, [s], do_sample=False, pad_token_id=0, max_new_tokens=n)[0]
                for s, n in zip(seqs, kwargs["max_new_tokens"], strict=True)]
    else:
        want = alone(model, seqs, do_sample=False, pad_token_id=0, **{"max_new_tokens": 8, **kwargs})
    assert tokens(got) == want


def test_stop_strings_with_the_tokenizer_stop_as_generate_does():
    from .models import build_llama_vocab, byte_tokenizer

    tok, model = byte_tokenizer(), build_llama_vocab(512)
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in ["hello world", "the quick brown fox", "a user asks"]]
    free = alone(model, seqs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    # the first printable token request 1 produces after its first one
    stop = next(t for t in (tok.decode([x]) for x in free[1][1:]) if t.isascii() and t.strip())
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, stop_strings=[stop])
    got = prepack.generate(model, seqs, tokenizer=tok, return_logprobs=True, **kwargs)
    assert [g.tokens.tolist() for g in got] == alone(model, seqs, tokenizer=tok, **kwargs)
    assert got[1].finish_reason == "stop" and len(got[1].tokens) < 8


@pytest.mark.parametrize("kwargs", [
    {"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"bad_words_ids": [[7], [9, 11]]},
    {"suppress_tokens": [1, 2, 3]}, {"begin_suppress_tokens": [5]},
])
def test_transformers_logits_processors_apply_per_request(kwargs):
    model, seqs = build("qwen2"), prompts(MIXED)
    got = prepack.generate(model, seqs, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
    assert tokens(got) == alone(model, seqs, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


def test_seeded_sampling_equals_generate_alone_seeded_per_request():
    model, seqs = build("llama"), prompts(MIXED)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, pad_token_id=0)
    got = prepack.generate(model, seqs, seed=1000, **kwargs)
    assert tokens(got) == alone(model, seqs, seed=1000, **kwargs)


def test_a_requests_samples_do_not_depend_on_its_neighbours_or_the_budget():
    model, seqs = build("llama"), prompts(MIXED)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.3, pad_token_id=0, seed=7)
    everyone = prepack.generate(model, seqs, **kwargs)
    one_by_one = prepack.generate(model, seqs, max_batch=1, **kwargs)
    assert tokens(everyone) == tokens(one_by_one)


def test_top_k_1_sampling_equals_greedy_for_every_sample():
    model, seqs = build("qwen2"), prompts(MIXED)
    greedy = alone(model, seqs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = prepack.generate(model, seqs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3, pad_token_id=0)
    assert tokens(out) == [g for g in greedy for _ in range(3)]


@pytest.mark.parametrize("do_sample", [False, True])
def test_logprobs_equal_a_teacher_forced_packed_forward(do_sample):
    model, seqs = build("gemma2"), prompts(MIXED)
    temperature = 0.8 if do_sample else 1.0
    got = prepack.generate(model, seqs, max_new_tokens=6, do_sample=do_sample, temperature=temperature,
                           pad_token_id=0, return_logprobs=True, seed=3)
    full = [torch.cat([s, g.tokens]) for s, g in zip(seqs, got, strict=True)]
    spans = [(len(s) - 1, len(f) - 1) for s, f in zip(seqs, full, strict=True)]
    logits = prepack.forward_at(model, full, spans)
    assert len(logits) == len(got)
    for lg, g in zip(logits, got, strict=True):
        want = torch.log_softmax(lg.float() / temperature, -1).gather(1, g.tokens[:, None])[:, 0]
        torch.testing.assert_close(g.logprobs, want, atol=1e-4, rtol=0)


def test_generate_iter_yields_in_completion_order_when_asked():
    model, seqs = build("llama"), prompts([4, 4, 4])
    kwargs = dict(max_new_tokens=[6, 2, 4], do_sample=False, pad_token_id=0, return_logprobs=True)
    done = list(prepack.generate_iter(model, seqs, order="completion", **kwargs))
    assert [d.index for d in done] == [1, 2, 0]
    assert [d.index for d in prepack.generate_iter(model, seqs, **kwargs)] == [0, 1, 2]


def test_a_forward_wrapped_without_a_signature_decodes_the_same_tokens():
    model, seqs = build("llama"), prompts(MIXED)
    want = alone(model, seqs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    own = model.forward
    model.forward = lambda *a, **k: own(*a, **k)
    assert tokens(prepack.generate(model, seqs, max_new_tokens=6, do_sample=False, pad_token_id=0)) == want


def test_decoding_never_calls_model_generate():
    model, seqs = build("llama"), prompts([3, 4])

    def refuse(*a, **k):
        raise AssertionError("model.generate was called")

    model.generate = refuse
    assert len(prepack.generate(model, seqs, max_new_tokens=2, do_sample=False)) == 2


def test_generate_wraps_the_models_attention_implementation_while_it_runs():
    model = build("llama")
    model.set_attn_implementation("eager")
    seen = set()
    model.register_forward_pre_hook(lambda module, args: seen.add(module.config._attn_implementation))
    prepack.generate(model, prompts([3, 4]), max_new_tokens=2, do_sample=False)
    assert seen == {"prepack|eager"}
    assert model.config._attn_implementation == "eager"  # as the user left it


def test_generate_iter_streams_any_iterable_in_input_order():
    model, seqs = build("llama"), prompts([5, 2, 8, 3, 6])
    streamed = list(prepack.generate_iter(model, (s for s in seqs), max_batch=2, max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert tokens(streamed) == alone(model, seqs, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_generate_iter_refuses_a_2d_tensor_without_its_mask_as_generate_does():
    model, ids = build("llama"), torch.randint(3, 128, (2, 4))
    for call in (prepack.generate, lambda *a, **k: list(prepack.generate_iter(*a, **k))):
        with pytest.raises(ValueError, match=r"2-D input_ids tensor of shape \(2, 4\) without its attention_mask"):
            call(model, ids, max_new_tokens=2)


def test_generate_takes_left_padded_tokenizer_output():
    from .models import tokenizer

    tok = tokenizer()
    tok.padding_side = "left"
    texts = ["hello world", "the quick brown fox jumps", "a user asks"]
    model, enc = build("llama"), tok(texts, padding=True, return_tensors="pt")
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    want = alone(model, seqs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens(prepack.generate(model, enc, max_new_tokens=3, do_sample=False, pad_token_id=0)) == want


def test_generate_refuses_an_iterator_and_names_generate_iter():
    with pytest.raises(ValueError, match="generate takes a list of prompts, got generator.*use prepack.generate_iter"):
        prepack.generate(build("llama"), (p for p in prompts([3, 4])), max_new_tokens=2)


def test_a_request_over_the_kv_budget_is_named_with_the_limit():
    with pytest.raises(ValueError, match=r"request 1 needs 24 tokens \(20 prompt, at most 5 new\) but kv_budget is 16"):
        prepack.generate(build("llama"), [[5, 6], [7] * 20], kv_budget=16, max_new_tokens=5)


def test_an_empty_prompt_in_a_stream_is_named_by_its_position():
    seqs = [p.tolist() for p in prompts([3, 4, 5])] + [[]]
    with pytest.raises(ValueError, match=r"request 3 is empty"):
        list(prepack.generate_iter(build("llama"), iter(seqs), max_new_tokens=2))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_return_sequences": 0}, "num_return_sequences must be an integer >= 1"),
    ({"num_beams": 2}, "does not support num_beams=2"),
    ({"return_dict_in_generate": True}, "does not support return_dict_in_generate=True.*return_logprobs=True"),
    ({"output_scores": True}, "does not support output_scores=True.*return_logprobs=True"),
    ({"attention_mask": torch.ones(2, 3)}, "builds 'attention_mask' itself"),
    ({"max_new_tokns": 2}, "does not take max_new_tokns"),
    ({"backend": "sdpa_masked"}, "cannot continue earlier keys; use a varlen backend"),
    ({"decode": True}, "decode=True needs tokenizer="),
])
def test_unsupported_generate_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepack.generate(build("llama"), prompts([3, 4]), max_new_tokens=2, **kwargs)


def test_the_documented_cache_route_gives_ordinary_generates_tokens():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "kv_scatter.md").read_text()
    block = re.search(r"## Continuing a prefill.*?runs this block\):\n\n```python\n(.*?)```", text, re.S).group(1)
    model, seqs = build("mistral"), prompts([1, 5, 17, 3])
    scope = {"model": model, "token_lists": [s.tolist() for s in seqs]}
    exec(block, scope)
    ids, mask = prepack.jobs.generation.left_pad(seqs, 0, "cpu")
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(scope["new_tokens"], want[:, ids.shape[1]:])


def test_generate_from_a_config_with_use_cache_false_matches_each_prompt_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import COMMON

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, use_cache=False)).eval()
    seqs = prompts([3, 9, 5])
    got = prepack.generate(model, seqs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens(got) == alone(model, seqs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)


def test_sampling_requests_warpers_are_applied_as_tensors_not_per_request_and_equal_generate_alone(monkeypatch):
    from transformers.generation.logits_process import TopKLogitsWarper

    rows_seen, call = [], TopKLogitsWarper.__call__

    def counted(self, input_ids, scores):
        rows_seen.append(scores.shape[0])
        return call(self, input_ids, scores)

    monkeypatch.setattr(TopKLogitsWarper, "__call__", counted)
    model, seqs = build("llama"), prompts(MIXED)
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.7, pad_token_id=0)
    got = prepack.generate(model, seqs, seed=1000, **kwargs)
    engine_rows = list(rows_seen)
    assert tokens(got) == alone(model, seqs, seed=1000, **kwargs)
    assert engine_rows == []  # prepack.jobs.sampling applies top-k to all rows at once; the warper is never called per request
