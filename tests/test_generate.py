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
    assert got[0].tolist() == first[0][:3].tolist()
    assert len(got[1]) == 6 or got[1][-1] == eos


def test_generate_leaves_the_models_attention_implementation_alone():
    model = build("llama")
    before = model.config._attn_implementation
    prepack.generate(model, prompts([3, 4]), max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == before


def test_passing_input_ids_to_generate_is_rejected():
    with pytest.raises(ValueError, match="builds 'attention_mask' itself"):
        prepack.generate(build("llama"), prompts([3]), attention_mask=torch.ones(1, 3))


def test_empty_prompt_error_names_the_request():
    with pytest.raises(ValueError, match="request 2 is empty"):
        prepack.generate(build("llama"), [[1], [2, 3], []], max_new_tokens=2)
