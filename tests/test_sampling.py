"""prepack.jobs.sampling: many requests' token choice at once, bit for bit what each request's own processors and
torch.multinomial with its own generator give it alone."""

import numpy as np
import pytest
import torch
from transformers import StoppingCriteriaList
from transformers.generation.logits_process import (
    LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper,
)

import prepack
from prepack.executor.scheduler import Request
from prepack.jobs import sampling
from prepack.jobs.decoding import IdsBuffer, Rules
from prepack.jobs.engine import _choose

from .models import build, prompts
from .test_generate import MIXED, alone, tokens


def random_lists(m: int, g: torch.Generator) -> list:
    """m processor lists in generate's order, each with its own subset of the four warpers and its own settings."""
    lists = []
    for _ in range(m):
        keep = int(torch.randint(1, 4, (1,), generator=g))
        fill = [-float("inf"), -1e4][int(torch.randint(0, 2, (1,), generator=g))]
        pick = torch.rand(4, generator=g) < 0.6
        lst = LogitsProcessorList()
        if pick[0]:
            lst.append(TemperatureLogitsWarper(float(torch.rand(1, generator=g)) * 1.5 + 0.2))
        if pick[1]:
            lst.append(TopKLogitsWarper(int(torch.randint(1, 60, (1,), generator=g)), filter_value=fill, min_tokens_to_keep=keep))
        if pick[2]:
            lst.append(TopPLogitsWarper(float(torch.rand(1, generator=g)) * 0.99 + 0.005, filter_value=fill, min_tokens_to_keep=keep))
        if pick[3]:
            lst.append(MinPLogitsWarper(float(torch.rand(1, generator=g)) * 0.5, filter_value=fill, min_tokens_to_keep=keep))
        lists.append(lst)
    return lists


def scores_cases(n_cases: int = 30, m: int = 12):
    g = torch.Generator().manual_seed(0)
    for t in range(n_cases):
        vocab = int(torch.randint(2, 400, (1,), generator=g))
        x = torch.randn(m, vocab, generator=g) * float(torch.rand(1, generator=g) * 6 + 0.1)
        if t % 3 == 0:
            x = (x * 2).round() / 2  # many tied values: across top-p cuts and min-p's kept tokens
        if t % 4 == 0:
            x[:, : vocab // 3] = -float("inf")  # an earlier processor's removals
        if t % 5 == 0:
            x[1] = 0.0  # a flat row
        if t % 7 == 0:
            x[2, 0] = float("nan")
        yield x, random_lists(m, g)


def each_alone(x: torch.Tensor, lists: list) -> torch.Tensor:
    ids = torch.zeros(1, 0, dtype=torch.long)
    return torch.cat([lst(ids, x[j : j + 1].clone()) for j, lst in enumerate(lists)])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_rows_with_different_warper_settings_are_warped_as_each_row_alone():
    for x, lists in scores_cases():
        steps = {sampling.row_wise_steps(lst) for lst in lists}
        assert steps == {sampling.ORDER}
        assert same(sampling.warp_rows(x, lists, sampling.ORDER), each_alone(x, lists))


def test_warpers_in_an_order_of_the_callers_own_are_applied_in_that_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g) * 3
    lists = [LogitsProcessorList([TopPLogitsWarper(0.5 + 0.1 * j), TemperatureLogitsWarper(0.5 + 0.2 * j),
                                  TopKLogitsWarper(40 + j)]) for j in range(5)]
    steps = sampling.row_wise_steps(lists[0])
    assert steps == ("TopPLogitsWarper", "TemperatureLogitsWarper", "TopKLogitsWarper")
    assert same(sampling.warp_rows(x, lists, steps), each_alone(x, lists))


def test_processors_that_read_the_ids_are_not_row_wise():
    assert sampling.row_wise_steps([TemperatureLogitsWarper(0.7), RepetitionPenaltyLogitsProcessor(1.2)]) is None


def test_ids_buffer_grows_in_place_and_earlier_views_keep_what_they_saw():
    buf = IdsBuffer(np.array([5, 6, 7]), max_length=6, device="cpu")
    first = buf.view([])
    assert first.tolist() == [[5, 6, 7]]
    assert buf.view([9, 1]).tolist() == [[5, 6, 7, 9, 1]]
    assert first.tolist() == [[5, 6, 7]] and buf.view([9, 1, 2]).tolist() == [[5, 6, 7, 9, 1, 2]]


def test_a_step_with_requests_of_different_sampling_settings_gives_each_what_it_gets_alone():
    """The engine's token choice (_choose) for requests whose rules differ, against each request's own transformers
    processors and torch.multinomial with its own generator, over consecutive steps."""
    model = build("llama")
    settings = [dict(do_sample=True, temperature=0.7, top_p=0.9), dict(do_sample=True, top_k=5, min_p=0.1),
                dict(do_sample=True, temperature=1.3, top_k=0), dict(do_sample=False),
                dict(do_sample=True, repetition_penalty=1.3, top_p=0.8), dict(do_sample=True, top_k=1)]
    seqs = prompts([4, 7, 3, 9, 5, 6])
    reqs, oracle = [], []
    for i, (kw, s) in enumerate(zip(settings, seqs)):
        rules = Rules(model, dict(max_new_tokens=8, pad_token_id=0, **kw)).for_request(s, "cpu", index=i)
        twin = Rules(model, dict(max_new_tokens=8, pad_token_id=0, **kw)).for_request(s, "cpu", index=i)
        gens = [torch.Generator().manual_seed(50 + i) if rules.do_sample else None for _ in range(2)]
        reqs.append(Request(i, s.numpy(), rules, gens[0]))
        oracle.append((twin, gens[1]))
    g = torch.Generator().manual_seed(9)
    for step in range(5):
        logits = torch.randn(len(reqs), 128, generator=g) * 3
        got, _ = _choose(reqs, logits, "cpu", logprobs=False)
        for r, (twin, gen), tok, row in zip(reqs, oracle, got, logits):
            ids = torch.from_numpy(np.concatenate([r.prompt, np.asarray(r.tokens, np.int64)]))[None]
            scores = twin.processors(ids, row[None].clone())
            want = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[0, 0] if gen is not None else scores.argmax(-1)[0]
            assert tok == int(want), (r.index, step)
            r.tokens.append(tok)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.8, top_k=30, top_p=0.85, min_p=0.05), dict(repetition_penalty=1.4, top_p=0.9),
])
def test_sampled_tokens_equal_generate_alone_over_many_steps(kwargs):
    model, seqs = build("qwen2"), prompts(MIXED)
    kwargs = dict(max_new_tokens=10, do_sample=True, pad_token_id=0, **kwargs)
    assert tokens(prepack.generate(model, seqs, seed=300, **kwargs)) == alone(model, seqs, seed=300, **kwargs)


def test_stopping_criteria_read_the_grown_ids_as_generate_passes_them():
    class StopOnRepeat:  # reads the ids: stops when the newest token appeared before in the request
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([bool((input_ids[0, :-1] == input_ids[0, -1]).any())])

    model, seqs = build("llama"), prompts(MIXED)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, pad_token_id=0,
                  stopping_criteria=StoppingCriteriaList([StopOnRepeat()]))
    got = prepack.generate(model, seqs, seed=11, **kwargs)
    assert tokens(got) == alone(model, seqs, seed=11, **kwargs)
    assert "stop" in {g.finish_reason for g in got}
