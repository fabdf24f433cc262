"""prepack.forward_at: outputs at chosen positions of each request equal running each request alone."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack

from .models import ARCHITECTURES, build, prompts

LENGTHS = [1, 5, 17, 3, 30, 12]


def alone(model, seqs, output):
    """Each request run on its own: (L_i, V) logits or (L_i, D) last hidden states."""
    with torch.no_grad():
        if output == "logits":
            return [model(s[None]).logits[0] for s in seqs]
        return [model.model(s[None]).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("output", ["logits", "hidden_states"])
def test_all_positions_match_each_request_alone(arch, output):
    model, seqs = build(arch), prompts(LENGTHS)
    got = prepack.forward_at(model, seqs, "all", output=output)
    for mine, theirs in zip(got, alone(model, seqs, output), strict=True):
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("output", ["logits", "hidden_states"])
def test_last_position_gives_one_row_per_request_in_request_order(output):
    model, seqs = build("llama"), prompts(LENGTHS)
    got = prepack.forward_at(model, seqs, "last", output=output)
    want = torch.stack([x[-1] for x in alone(model, seqs, output)])
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("backend, kwargs", [
    ("sdpa_varlen", {"token_budget": 32}),
    ("sdpa_masked", {"capacity": 30, "token_budget": 60}),
    ("flex", {}),
])
def test_spans_are_exact_for_every_layout_and_micro_batching(backend, kwargs):
    model, seqs = build("gemma2"), prompts(LENGTHS)
    spans = [(0, 1), (2, 5), (0, 17), (3, 3), (10, 30), (11, 12)]
    got = prepack.forward_at(model, seqs, spans, backend=backend, **kwargs)
    for (s, e), mine, theirs in zip(spans, got, alone(model, seqs, "logits"), strict=True):
        assert mine.shape == (e - s, theirs.shape[-1])
        assert torch.allclose(mine, theirs[s:e], atol=1e-4, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6), st.data())
def test_any_spans_come_back_exact_and_in_request_order(lengths, data):
    model = build("llama")
    seqs = prompts(lengths, seed=len(lengths))
    spans = []
    for n in lengths:
        s = data.draw(st.integers(0, n))
        spans.append((s, data.draw(st.integers(s, n))))
    budget = data.draw(st.integers(max(lengths), sum(lengths)))
    got = prepack.forward_at(model, seqs, spans, output="hidden_states", token_budget=budget)
    for (s, e), mine, theirs in zip(spans, got, alone(model, seqs, "hidden_states"), strict=True):
        assert torch.allclose(mine, theirs[s:e], atol=1e-4, rtol=0)


def test_reduce_sees_each_forwards_outputs_and_where_they_land():
    model, seqs = build("llama"), prompts(LENGTHS)
    calls = []

    def reduce(values, rows):
        calls.append(len(rows))
        return values.argmax(-1, keepdim=True)

    got = prepack.forward_at(model, seqs, "all", reduce=reduce, token_budget=32)
    assert len(calls) > 1 and sum(calls) == sum(LENGTHS)
    for mine, theirs in zip(got, alone(model, seqs, "logits"), strict=True):
        assert torch.equal(mine[:, 0], theirs.argmax(-1))


def test_a_span_outside_the_request_is_refused_with_its_index():
    with pytest.raises(ValueError, match=r"request 1 has 4 tokens but its span is \(2, 6\)"):
        prepack.forward_at(build("llama"), prompts([3, 4]), [(0, 3), (2, 6)])


def test_logits_from_a_model_without_a_language_model_head_are_refused():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from .models import COMMON

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=2)).eval()
    with pytest.raises(TypeError, match="LlamaForSequenceClassification has no language-model head"):
        prepack.forward_at(model, prompts([3, 4]), "last", output="logits")


def test_unknown_output_is_refused():
    with pytest.raises(ValueError, match="output must be one of 'logits', 'hidden_states'"):
        prepack.forward_at(build("llama"), prompts([3]), output="attentions")


@pytest.mark.parametrize("output, width", [("logits", 128), ("hidden_states", 64)])
def test_no_requests_give_zero_rows_of_the_outputs_width(output, width):
    model = build("llama")
    assert prepack.forward_at(model, [], "last", output=output).shape == (0, width)
    assert prepack.forward_at(model, [], "all", output=output) == []
    assert prepack.forward_at(model, [], [], output=output) == []


def test_no_requests_with_a_reduce_give_zero_rows_of_what_it_returns():
    out = prepack.forward_at(build("llama"), [], "last", reduce=lambda values, rows: values[:, :3] * 2)
    assert out.shape == (0, 3)
