"""Each request through prepack.generate has its own state, clock and limits, as with its own model.generate call.

The oracle is ``model.generate`` on that prompt alone; what prepack cannot do so is refused, naming the
request (or the argument) and the limit.
"""

import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LogitsProcessor, StoppingCriteria

import prepack

from .models import COMMON, build, prompts
from .test_generate import alone, tokens

GREEDY = dict(do_sample=False, pad_token_id=0)


class ForceAfter(LogitsProcessor):
    """Stateful: forces ``token`` once it has been called ``k`` times (it counts its calls, not the ids)."""

    def __init__(self, token: int, k: int):
        self.token, self.k, self.calls = token, k, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.k:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0.0
        return scores


class StopAfter(StoppingCriteria):
    """Stateful: stops once it has been called ``n`` times."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)


def test_a_stateful_logits_processor_advances_once_per_step_of_each_request():
    from transformers import LogitsProcessorList

    model, seqs = build("llama"), prompts([5, 9, 3, 12])
    got = prepack.generate(model, seqs, max_new_tokens=6, logits_processor=LogitsProcessorList([ForceAfter(7, 3)]), **GREEDY)
    want = [alone(model, [s], max_new_tokens=6, logits_processor=LogitsProcessorList([ForceAfter(7, 3)]), **GREEDY)[0]
            for s in seqs]
    assert tokens(got) == want


def test_a_stateful_stopping_criterion_counts_each_requests_own_steps():
    from transformers import StoppingCriteriaList

    model, seqs = build("llama"), prompts([5, 9, 3, 12])
    got = prepack.generate(model, seqs, max_new_tokens=8, stopping_criteria=StoppingCriteriaList([StopAfter(5)]), **GREEDY)
    want = [alone(model, [s], max_new_tokens=8, stopping_criteria=StoppingCriteriaList([StopAfter(5)]), **GREEDY)[0]
            for s in seqs]
    assert tokens(got) == want and all(len(t) == 5 for t in want)


def test_the_callers_processor_objects_are_left_untouched():
    from transformers import LogitsProcessorList

    mine = ForceAfter(7, 3)
    prepack.generate(build("llama"), prompts([5, 9]), max_new_tokens=4, logits_processor=LogitsProcessorList([mine]), **GREEDY)
    assert mine.calls == 0  # each request ran its own copy, as each model.generate call of a loop would need


def test_a_processor_that_cannot_be_copied_is_refused_naming_it():
    from transformers import LogitsProcessorList

    class Holding(ForceAfter):
        def __deepcopy__(self, memo):
            raise TypeError("cannot pickle '_thread.lock' object")

    with pytest.raises(ValueError, match=r"logits_processor\[0\] \(Holding\) cannot be copied"):
        prepack.generate(build("llama"), prompts([5]), max_new_tokens=2, logits_processor=LogitsProcessorList([Holding(7, 3)]),
                         **GREEDY)


def test_prefix_allowed_tokens_fn_gets_the_batch_id_generate_gives_that_row():
    """batch id = the request's index (prompt-major, ``p * G + g``): the row model.generate gives it for the whole
    list, and for a single prompt, what model.generate gives it alone."""
    model, seqs = build("llama"), prompts([5, 9, 3])
    allowed = {b: [10 + b, 20 + b] for b in range(6)}
    got = prepack.generate(model, seqs, max_new_tokens=4, prefix_allowed_tokens_fn=lambda b, ids: allowed[b], **GREEDY)
    want = [alone(model, [s], max_new_tokens=4, prefix_allowed_tokens_fn=lambda _b, ids, p=p: allowed[p], **GREEDY)[0]
            for p, s in enumerate(seqs)]
    assert tokens(got) == want
    one = prepack.generate(model, seqs[:1], max_new_tokens=3, prefix_allowed_tokens_fn=lambda b, ids: allowed[b],
                           do_sample=True, num_return_sequences=2, seed=0, pad_token_id=0)
    assert [set(t.tokens.tolist()) <= set(allowed[g]) for g, t in enumerate(one)] == [True, True]


@pytest.mark.parametrize("value", [-1, 0, 1.5, True, "2"])
@pytest.mark.parametrize("entry", ["generate", "generate_iter"])
def test_a_bad_max_batch_is_refused_naming_it(entry, value):
    model, seqs = build("llama"), prompts([5, 9])
    with pytest.raises(ValueError, match=r"max_batch must be a positive integer"):
        list(getattr(prepack, entry)(model, seqs, max_new_tokens=2, max_batch=value, **GREEDY))


@pytest.mark.parametrize("option", ["decode", "return_logprobs", "share_prefixes", "progress"])
def test_a_flag_that_is_not_a_bool_is_refused_naming_it(option):
    with pytest.raises(ValueError, match=rf"{option} must be True"):
        prepack.generate(build("llama"), prompts([5]), max_new_tokens=2, **{option: "yes"}, **GREEDY)


def test_max_time_counts_from_a_requests_admission_not_from_its_queueing():
    """Alone each request takes about 6 * 0.03 s; queued one at a time, the last waits over 1.5 s before it starts."""
    from transformers import LogitsProcessorList

    class Slow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            time.sleep(0.03)
            return scores

    model, seqs = build("llama"), prompts([4] * 10)
    got = prepack.generate(model, seqs, max_new_tokens=6, max_time=1.5, max_batch=1,
                           logits_processor=LogitsProcessorList([Slow()]), eos_token_id=None, **GREEDY)
    assert [len(t.tokens) for t in got] == [6] * 10


def dropout_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**COMMON, attention_dropout=0.5)).eval()


def test_generate_refuses_train_mode_with_dropout_as_prefill_does():
    model = dropout_llama().train()
    for call in (lambda: prepack.prefill(model, prompts([4])), lambda: prepack.generate(model, prompts([4]), max_new_tokens=2)):
        with pytest.raises(prepack.UnsupportedModelError, match="train mode with attention_dropout=0.5"):
            call()


def test_train_mode_set_while_generate_iter_is_paused_is_refused_at_the_next_step():
    model, seqs = dropout_llama(), prompts([4, 6, 5])
    it = prepack.generate_iter(model, seqs, max_new_tokens=3, max_batch=1, **GREEDY)
    first = next(it)
    assert first.tokens.tolist() == alone(model, seqs[:1], max_new_tokens=3, **GREEDY)[0]
    model.train()
    with pytest.raises(prepack.UnsupportedModelError, match="train mode"):
        next(it)


def gpt2(n_positions: int = 32):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=n_positions, bos_token_id=1, eos_token_id=2,
    )).eval()


def test_a_request_past_gpt2s_position_table_is_refused_before_any_request_runs():
    model, seqs = gpt2(32), prompts([4, 20, 6])
    with pytest.raises(ValueError, match=r"request 1 needs 35 positions \(20 prompt \+ 16 new tokens, the last not fed back\) but GPT2LMHeadModel.s position table holds 32; lower max_new_tokens to at most 13"):
        prepack.generate(model, seqs, max_new_tokens=16, **GREEDY)


def test_gpt2_up_to_its_last_position_equals_generate_alone():
    model, seqs = gpt2(32), prompts([4, 20, 6])
    got = prepack.generate(model, seqs, max_new_tokens=13, **GREEDY)  # 20 + 13 - 1 = 32 positions fed, the last one 31
    assert tokens(got) == alone(model, seqs, max_new_tokens=13, **GREEDY)


@pytest.mark.parametrize("kwargs", [
    dict(seed=np.int64(3)), dict(seed=torch.tensor(3)), dict(max_new_tokens=np.int64(5)), dict(max_new_tokens=torch.tensor(5)),
    dict(max_new_tokens=np.array(5)),
], ids=["seed_np", "seed_tensor", "max_new_np", "max_new_tensor", "max_new_0d_array"])
def test_integer_scalars_generate_accepts_are_accepted(kwargs):
    model, seqs = build("llama"), prompts([5, 9])
    want = dict(seed=3, max_new_tokens=5)
    got = prepack.generate(model, seqs, **{**want, **kwargs}, do_sample=True, pad_token_id=0)
    assert tokens(got) == tokens(prepack.generate(model, seqs, **want, do_sample=True, pad_token_id=0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=[5.7, 5]), r"max_new_tokens\[0\] must be a positive integer, got 5.7"),
    (dict(max_new_tokens=[5, 0]), r"max_new_tokens\[1\] must be a positive integer, got 0"),
    (dict(max_new_tokens=[[5], [5]]), r"max_new_tokens\[0\] must be a positive integer"),
    (dict(max_new_tokens=5.7), r"max_new_tokens must be a positive integer, got 5.7"),
    (dict(max_new_tokens="5"), r"max_new_tokens must be a positive integer, got '5'"),
    (dict(max_new_tokens=True), r"max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens=5, min_new_tokens=1.5), r"min_new_tokens must be an integer, got 1.5"),
    (dict(max_new_tokens=5, seed=1.5), r"seed must be an integer, got 1.5"),
    (dict(max_new_tokens=5, seed="3"), r"seed must be an integer, got '3'"),
], ids=["float_in_list", "zero_in_list", "nested", "float", "str", "bool", "float_min_new", "float_seed", "str_seed"])
def test_argument_values_generate_would_not_take_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepack.generate(build("llama"), prompts([5, 9]), **kwargs, **GREEDY)


def test_generate_refuses_order_naming_generate_iter():
    with pytest.raises(ValueError, match=r"order= is an option of prepack.generate_iter"):
        prepack.generate(build("llama"), prompts([5]), max_new_tokens=2, order="completion", **GREEDY)


def reward_model(pad_token_id=2):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=1, pad_token_id=pad_token_id)).eval()


def own_forward(model, seqs) -> torch.Tensor:
    """The oracle: the classifier's own forward on each sequence alone, its own head choosing the token."""
    with torch.no_grad():
        return torch.cat([model(s[None]).logits for s in seqs])


def test_classify_scores_the_last_token_that_is_not_the_pad_id_as_the_models_own_head():
    """pad = EOS (id 2), as in many Llama-style reward models: a prompt ending in EOS is scored before its EOS run."""
    model = reward_model(pad_token_id=2)
    eos = torch.tensor([2])
    seqs = [torch.cat([s, eos]) for s in prompts([5, 9])] + [torch.cat([s, eos, eos]) for s in prompts([4], seed=1)] + prompts([7])
    got = prepack.classify(model, seqs)
    assert (got - own_forward(model, seqs)).abs().max() <= 1e-4



def test_lm_eval_generate_until_ignores_a_stop_sequence_that_starts_in_the_context_as_hf_does():
    """Contexts end in "\\n", the stop sequence is "\\n\\n", and the model is nudged towards "\\n": hf checks only the
    generated text, so a first "\\n" does not stop it; the oracle is lm-eval's own hf model."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from prepack.lm_eval import PrepackLM

    from .lm_eval_oracle import hflm
    from .models import build_llama_vocab, byte_tokenizer

    tok = byte_tokenizer()
    tok.eos_token = "[PAD]"
    model = build_llama_vocab(len(tok))
    newline = tok.encode("\n", add_special_tokens=False)[0]

    def nudge(module, args, logits):
        logits = logits.clone()
        logits[..., newline] += 0.3
        return logits

    model.lm_head.register_forward_hook(nudge)
    contexts = ["the quick brown fox\n", "hello world\n", "the lazy dog\n", "how are you\n", "fox jumps over\n", "today\n"]
    requests = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}), i)
                for i, c in enumerate(contexts)]
    want = hflm(model, tokenizer=tok).generate_until(requests, disable_tqdm=True)
    assert any(w.startswith("\n") for w in want)  # the case in question occurs
    assert PrepackLM(pretrained=model, tokenizer=tok, batch_size=4).generate_until(requests, disable_tqdm=True) == want


def bf16_requests():
    g = torch.Generator().manual_seed(0)
    reqs = []
    for _ in range(6):
        ctx = torch.randint(3, 128, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
        reqs.append((None, ctx, torch.randint(3, 128, (40,), generator=g).tolist()))  # sums near -195: bf16 steps of 1
    reqs.append((None, reqs[0][1], torch.randint(3, 128, (30,), generator=g).tolist()))  # a shared context
    return reqs


def test_lm_eval_in_bf16_sums_log_likelihoods_as_hf_does():
    pytest.importorskip("lm_eval")
    from prepack.lm_eval import PrepackLM

    from .lm_eval_oracle import hflm

    model, reqs = build("llama").to(torch.bfloat16), bf16_requests()
    hf = hflm(model, batch_size=4)
    want = hf._loglikelihood_tokens(reqs)
    got = PrepackLM(pretrained=model, tokenizer=hf.tokenizer)._loglikelihood_tokens(reqs)
    assert [lp for lp, _ in got] == [lp for lp, _ in want]


def test_lm_eval_sum_dtype_float64_sums_each_requests_own_token_log_probs_exactly():
    pytest.importorskip("lm_eval")
    from prepack.lm_eval import PrepackLM

    from .lm_eval_oracle import word_tokenizer

    model, reqs = build("llama").to(torch.bfloat16), bf16_requests()
    want = []
    with torch.no_grad():
        for _, ctx, cont in reqs:  # the plain model on the request alone, its bf16 log-probs summed in float64
            logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1 :]
            want.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).double().sum().item())
    got = PrepackLM(pretrained=model, tokenizer=word_tokenizer(), sum_dtype="float64")._loglikelihood_tokens(reqs)
    # within two bf16 steps of one token's log-prob (0.03 near -5): the packed bf16 forward rounds a few values
    # differently from the one-request forward; the bf16-rounded sums differ by up to 0.44 here
    assert np.abs(np.array([lp for lp, _ in got]) - want).max() <= 0.07


def test_a_list_whose_request_exceeds_kv_budget_is_refused_before_any_request_runs():
    calls = []

    class Count(LogitsProcessor):
        def __call__(self, input_ids, scores):
            calls.append(1)
            return scores

    from transformers import LogitsProcessorList

    with pytest.raises(ValueError, match=r"request 2 needs 24 tokens \(20 prompt, at most 5 new\) but kv_budget is 16"):
        prepack.generate(build("llama"), prompts([4, 6, 20]), max_new_tokens=5, kv_budget=16, max_batch=1,
                         logits_processor=LogitsProcessorList([Count()]), **GREEDY)
    assert calls == []  # nothing decoded, so nothing was computed and lost
