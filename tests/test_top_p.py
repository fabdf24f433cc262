"""prepack.jobs.decoding.top_p_warp is transformers' TopPLogitsWarper, bit for bit, on batches with ties and -inf."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from prepack.jobs.decoding import top_p_warp


def cases(n_cases: int = 80):
    g = torch.Generator().manual_seed(0)
    for t in range(n_cases):
        vocab = int(torch.randint(2, 1000, (1,), generator=g))
        x = torch.randn(6, vocab, generator=g) * float(torch.rand(1, generator=g) * 8)
        if t % 3 == 0:
            x = (x * 2).round() / 2  # many tied values, some across the cut
        if t % 5 == 0:
            x[:, : vocab // 3] = -float("inf")  # an earlier processor's removals
        if t % 7 == 0:
            x[0] = 0.0  # a flat row
        top_p = float(torch.rand(1, generator=g)) * 0.998 + 0.001
        yield x, TopPLogitsWarper(top_p, min_tokens_to_keep=int(torch.randint(1, 4, (1,), generator=g)))


def test_top_p_warp_equals_transformers_warper_bit_for_bit():
    ties = 0
    for x, warper in cases():
        want = warper(torch.zeros(len(x), 0, dtype=torch.long), x.clone())
        got = top_p_warp(x.clone(), warper)
        assert torch.equal(got, want)
        ties += int((x.sort(-1).values.diff(dim=-1) == 0).any())
    assert ties > 0  # rows with tied values were among the cases


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_top_p_warp_hands_other_dtypes_to_the_warper(dtype):
    x = torch.randn(3, 50).to(dtype)
    warper = TopPLogitsWarper(0.8)
    assert torch.equal(top_p_warp(x.clone(), warper), warper(torch.zeros(3, 0, dtype=torch.long), x.clone()))


def test_top_p_warp_of_a_row_with_nan_is_the_warpers():
    x = torch.randn(2, 40)
    x[1, 3] = float("nan")
    warper = TopPLogitsWarper(0.7)
    want = warper(torch.zeros(2, 0, dtype=torch.long), x.clone())
    assert torch.equal(top_p_warp(x.clone(), warper).nan_to_num(), want.nan_to_num())
