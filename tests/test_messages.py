"""What a newcomer sees: errors that say what to type instead, and no warning per request.

A bad call is refused with the valid name nearest to what was typed (vLLM's and OpenAI's names
included), a single prompt passed without its list is told to wrap it, and transformers' advice
about padded batches (which prepack never builds) is not printed once per request.
"""

import contextlib
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prepack

from .models import COMMON, build, prompts, tokenizer

BAD_CALLS = [
    # (keywords of generate, prompts or None for two token prompts, the message)
    ({"max_tokens": 5}, None, r"does not take max_tokens \(did you mean max_new_tokens\?\)"),
    ({"n": 2}, None, r"does not take n \(did you mean num_return_sequences\?\)"),
    ({"logprobs": True}, None, r"does not take logprobs \(did you mean return_logprobs\?\)"),
    ({"stop": ["\n"]}, None, r"does not take stop \(did you mean stop_strings\?\)"),
    ({"max_new_token": 5}, None, r"does not take max_new_token \(did you mean max_new_tokens\?\)"),
    ({"temprature": 0.5}, None, r"does not take temprature \(did you mean temperature\?\)"),
    ({"return_logprob": True}, None, r"does not take return_logprob \(did you mean return_logprobs\?\)"),
    ({"token_budjet": 64}, None, r"does not take token_budjet \(did you mean token_budget\?\)"),
    ({"frobnicate": 1}, None, r"does not take frobnicate: not a generation option"),
    ({}, [5, 6, 7], r"got a single list of 3 token ids; wrap it in a list of prompts: \[ids\]"),
    ({}, torch.tensor([5, 6, 7]), r"got one 1-D tensor of 3 token ids; wrap it in a list of prompts: \[ids\]"),
    ({}, [{"role": "user", "content": "hi"}], r"got a single chat of 1 messages; wrap it in a list of prompts: \[chat\]"),
    ({}, "hello", r"got a single string; wrap it in a list of prompts: \[text\]"),
]


@pytest.mark.parametrize("kwargs, sequences, message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_a_bad_call_is_refused_with_what_to_type_instead(kwargs, sequences, message):
    with pytest.raises(ValueError, match=message):
        prepack.generate(build("llama"), prompts([3, 4]) if sequences is None else sequences, max_new_tokens=2, **kwargs)


def test_did_you_mean_offers_only_a_close_name():
    with pytest.raises(ValueError) as e:
        prepack.generate(build("llama"), prompts([3]), max_new_tokens=2, frobnicate=1)
    assert "did you mean" not in str(e.value)


def test_prefill_names_the_wrapping_list_too():
    with pytest.raises(ValueError, match=r"wrap it in a list of prompts: \[ids\]"):
        prepack.prefill(build("llama"), [5, 6, 7])


@contextlib.contextmanager
def transformers_records():
    """Every warning transformers' loggers emit inside the block, at transformers' default verbosity (warning;
    tests/conftest.py sets it to error for the rest of the suite)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    level = root.level
    root.setLevel(logging.WARNING)
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def no_pad_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    assert model.generation_config.pad_token_id is None and model.config.pad_token_id is None
    return model


def test_fifty_prompts_without_a_pad_token_id_print_no_transformers_warning():
    model = no_pad_model()
    with transformers_records() as records:
        out = prepack.generate(model, prompts([4 + i % 7 for i in range(50)]), max_new_tokens=2, do_sample=False)
    assert len(out) == 50
    assert [r.getMessage() for r in records] == []


def test_the_pad_token_id_resolves_to_eos_as_generate_does_alone():
    model, seqs = no_pad_model(), prompts([5, 9])
    got = prepack.generate(model, seqs, max_new_tokens=3, do_sample=False)
    for s, g in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), max_new_tokens=3, do_sample=False)
        assert g.tokens.tolist() == want[0, len(s):].tolist()


def test_a_warning_about_the_callers_own_configuration_is_shown_once_per_call():
    model = no_pad_model()
    with transformers_records() as records:
        prepack.generate(model, prompts([4] * 20), max_new_tokens=2, max_length=30, do_sample=False)
    said = [r.getMessage() for r in records]
    assert len([m for m in said if "max_new_tokens" in m and "max_length" in m]) == 1, said


def test_a_tokenizer_fills_text_without_warnings():
    tok, model = tokenizer(), no_pad_model()
    with transformers_records() as records:
        out = prepack.generate(model, ["hello world"] * 10, tokenizer=tok, max_new_tokens=2, do_sample=False)
    assert all(isinstance(g.text, str) for g in out)
    assert [r.getMessage() for r in records] == []


def test_quieting_later_requests_drops_only_the_calling_threads_transformers_logs():
    """The filter that keeps later requests quiet is on a shared logger: another thread's records still print."""
    import logging
    import threading

    from prepack.jobs.decoding import _RULE_LOGGERS, _quiet_transformers

    logger, seen = logging.getLogger(_RULE_LOGGERS[0]), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with _quiet_transformers(True):
            logger.error("from the quiet call")
            other = threading.Thread(target=logger.error, args=("from another thread",))
            other.start()
            other.join()
        logger.error("after the call")
    finally:
        logger.removeHandler(handler)
    assert seen == ["from another thread", "after the call"]
