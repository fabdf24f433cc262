"""prepack.generate: the same tokens model.generate gives for the same prompts, left-padded."""

import pytest
import torch

import prepack

from .models import ARCHITECTURES, build, left_pad, prompts

CASES = {
    "mixed": [1, 5, 17, 3, 30, 12],
    "length_one": [1, 1, 1],
    "equal": [9, 9, 9, 9],
    "one_long_many_short": [60, 2, 3, 1, 4, 2, 3, 2],
}


def padded_generate(model, seqs, **kwargs) -> list[list[int]]:
    """model.generate on left-padded prompts; each row cut after its first EOS, as prepack.generate returns it."""
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kwargs)
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert all(t == 0 for t in row[cut:])  # generate pads finished rows
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("case", CASES)
def test_generate_matches_padded_greedy(arch, case):
    model, seqs = build(arch), prompts(CASES[case])
    want = padded_generate(model, seqs, max_new_tokens=16, do_sample=False)
    got = prepack.generate(model, seqs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert [g.tolist() for g in got] == want


@pytest.mark.parametrize("backend, kwargs", [("sdpa_masked", {"capacity": 40}), ("sdpa_varlen", {"token_budget": 40})])
def test_generate_matches_padded_greedy_with_micro_batches(backend, kwargs):
    model, seqs = build("llama"), prompts(CASES["mixed"])
    want = padded_generate(model, seqs, max_new_tokens=16, do_sample=False)
    got = prepack.generate(model, seqs, backend=backend, max_new_tokens=16, do_sample=False, pad_token_id=0, **kwargs)
    assert [g.tolist() for g in got] == want


def test_sampling_kwargs_pass_through_to_model_generate():
    model, seqs = build("qwen2"), prompts([4, 7, 2])
    torch.manual_seed(123)
    want = padded_generate(model, seqs, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.7)
    torch.manual_seed(123)
    got = prepack.generate(model, seqs, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.7, pad_token_id=0)
    assert [g.tolist() for g in got] == want


def test_generation_stops_at_eos_and_drops_the_padding_after_it():
    model, seqs = build("llama"), prompts([5, 8])
    first = prepack.generate(model, seqs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(first[0][2])  # make the third token of request 0 its EOS
    got = prepack.generate(model, seqs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
    # every request as if alone: model.generate on that one prompt, cut after its first EOS
    want = [padded_generate(model, [s], max_new_tokens=6, do_sample=False, eos_token_id=eos)[0] for s in seqs]
    assert [g.tolist() for g in got] == want
    assert want[0] == first[0][:3].tolist()  # request 0 really stopped at its EOS


def test_generate_wraps_the_models_attention_implementation_visibly():
    model = build("llama")
    model.set_attn_implementation("eager")
    prepack.generate(model, prompts([3, 4]), max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == "prepack|eager"


def test_passing_input_ids_to_generate_is_rejected():
    with pytest.raises(ValueError, match="builds 'attention_mask' itself"):
        prepack.generate(build("llama"), prompts([3]), attention_mask=torch.ones(1, 3))


def test_empty_prompt_error_names_the_request():
    with pytest.raises(ValueError, match="request 2 is empty"):
        prepack.generate(build("llama"), [[1], [2, 3], []], max_new_tokens=2)


def _count_prompt_tokens(model):
    """Tokens each forward feeds the model (prefill forwards carry many, decode steps one per row)."""
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    return seen, hook


def test_several_samples_per_prompt_with_top_k_1_equal_each_prompts_greedy_continuation():
    model, seqs = build("qwen2"), prompts(CASES["mixed"])
    greedy = padded_generate(model, seqs, max_new_tokens=6, do_sample=False)
    out = prepack.generate(model, seqs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3)
    assert len(out) == 3 * len(seqs)
    assert [o.tolist() for o in out] == [g for g in greedy for _ in range(3)]


def test_seeded_samples_equal_model_generate_with_num_return_sequences():
    model, seqs = build("llama"), prompts([4, 11, 7])
    ids, mask = left_pad(seqs)
    torch.manual_seed(123)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, do_sample=True,
                              max_new_tokens=5, num_return_sequences=4)[:, ids.shape[1]:]
    torch.manual_seed(123)
    got = prepack.generate(model, seqs, do_sample=True, max_new_tokens=5, num_return_sequences=4)
    eos = model.generation_config.eos_token_id
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in want.tolist()]
    assert [g.tolist() for g in got] == cut


def test_each_distinct_prompt_is_prefilled_once_however_many_samples_and_copies():
    model = build("llama")
    a, b = prompts([20, 9])
    seen, hook = _count_prompt_tokens(model)
    prepack.generate(model, [a, b, a], max_new_tokens=2, do_sample=True, num_return_sequences=4)
    hook.remove()
    prefill_tokens = sum(s.numel() for s in seen if s[0] == 1 and s[1] > 1)
    assert prefill_tokens == (20 - 1) + (9 - 1)  # all but the last token of each distinct prompt, once


def test_waves_give_the_same_tokens_as_one_wave():
    model, seqs = build("mistral"), prompts(CASES["one_long_many_short"])
    one = prepack.generate(model, seqs, max_new_tokens=4, do_sample=False)
    waves = prepack.generate(model, seqs, max_new_tokens=4, do_sample=False, wave_size=3, progress=False)
    assert [w.tolist() for w in waves] == [o.tolist() for o in one] == padded_generate(model, seqs, max_new_tokens=4)


def test_generate_iter_streams_any_iterable_in_input_order():
    model, seqs = build("llama"), prompts([5, 2, 8, 3, 6])
    streamed = list(prepack.generate_iter(model, (s for s in seqs), wave_size=2, max_new_tokens=3, do_sample=False))
    assert [s.tolist() for s in streamed] == padded_generate(model, seqs, max_new_tokens=3)


def test_generate_iter_refuses_a_2d_tensor_without_its_mask_as_generate_does():
    model, ids = build("llama"), torch.randint(3, 128, (2, 4))
    for call in (prepack.generate, lambda *a, **k: list(prepack.generate_iter(*a, **k))):
        with pytest.raises(ValueError, match=r"2-D input_ids tensor of shape \(2, 4\) without its attention_mask"):
            call(model, ids, max_new_tokens=2)


def test_generate_iter_takes_tokenizer_output_as_generate_does():
    from .models import tokenizer

    tok = tokenizer()
    tok.padding_side = "left"
    texts = ["hello world", "the quick brown fox jumps", "a user asks"]
    model, enc = build("llama"), tok(texts, padding=True, return_tensors="pt")
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    want = padded_generate(model, seqs, max_new_tokens=3, do_sample=False)
    streamed = list(prepack.generate_iter(model, enc, wave_size=2, max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert [s.tolist() for s in streamed] == want
    assert [g.tolist() for g in prepack.generate(model, enc, max_new_tokens=3, do_sample=False, pad_token_id=0)] == want


def test_generate_refuses_an_iterator_and_names_generate_iter():
    with pytest.raises(ValueError, match="generate takes a list of prompts, got generator.*use prepack.generate_iter"):
        prepack.generate(build("llama"), (p for p in prompts([3, 4])), max_new_tokens=2)


def test_a_prompt_over_the_token_budget_is_named_by_its_request_number_not_its_distinct_prompt_number():
    with pytest.raises(ValueError, match=r"request 2 has 20 tokens, 19 to prefill \(all but the last\), but token_budget is 8"):
        prepack.generate(build("llama"), [[5, 6], [5, 6], [7] * 20], token_budget=8, max_new_tokens=2)


def test_an_error_that_names_no_request_gets_no_request_numbering_note():
    with pytest.raises(ValueError, match="max_new_tokns") as err:
        prepack.generate(build("llama"), prompts([3, 4, 5]), wave_size=1, max_new_tokns=2)
    assert "request numbers" not in str(err.value)


def test_an_error_in_a_later_wave_of_a_stream_says_where_the_wave_starts():
    seqs = [p.tolist() for p in prompts([3, 4, 5])] + [[]]
    with pytest.raises(ValueError, match=r"request 1 is empty.*\(request numbers count from 2, the start of this wave\)"):
        list(prepack.generate_iter(build("llama"), iter(seqs), wave_size=2, max_new_tokens=2))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_return_sequences": 0}, "num_return_sequences must be an integer >= 1"),
    ({"num_beams": 2}, "does not support num_beams=2"),
    ({"return_dict_in_generate": True}, "does not support return_dict_in_generate=True"),
    ({"wave_size": 0}, "wave_size must be an integer >= 1"),
    ({"decode": True}, "decode=True needs tokenizer="),
])
def test_unsupported_generate_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepack.generate(build("llama"), prompts([3, 4]), max_new_tokens=2, **kwargs)


def test_generate_from_a_config_with_use_cache_false_matches_padded_greedy():
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import COMMON

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, use_cache=False)).eval()
    seqs = prompts([3, 9, 5])
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    got = prepack.generate(model, seqs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert [g.tolist() for g in got] == want[:, ids.shape[1]:].tolist()
