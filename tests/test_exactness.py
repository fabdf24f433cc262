"""Exact, as one table: architecture x case x backend, each request against itself run alone.

For every architecture (tests/models.py: the plain families and one representative per further
attention variant: sinks, chunked attention with NoPE, MLA, per-layer windows):
* packed last-token logits equal each prompt's alone (fp32, max abs <= 1e-4), for every case of
  prompt lengths and every CPU backend;
* each request's cache equals the cache of its own solo prefill;
* greedy tokens equal ``model.generate`` on that prompt alone.
The oracle is :mod:`prepack.oracle` (the plain model, one request at a time), shared with
``benchmarks/model_zoo.py``.
"""

import pytest
import torch

import prepack
from prepack import oracle

from .models import ALL_ARCHITECTURES, build, prompts

TOL = 1e-4
CASES = {
    "mixed": [1, 5, 17, 3, 30, 12],
    "length_one": [1, 1, 1],
    "equal": [9, 9, 9, 9],
    "one_long_many_short": [60, 2, 3, 1, 4, 2, 3, 2],
}
# a token budget below the prompts' total: several forwards, each a varlen stream of its own
SPLIT = {"lengths": [1, 5, 17, 3, 12, 7, 9], "token_budget": 24}
BACKENDS = ["sdpa_varlen", "sdpa_masked", "flex", "reference"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_packed_logits_match_each_prompt_alone(arch, case):
    model, seqs = build(arch), prompts(CASES[case])
    got = prepack.prefill(model, seqs).logits
    want = oracle.alone_last_logits(model, seqs)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_packed_logits_match_alone_across_several_forwards(arch):
    model, seqs = build(arch), prompts(SPLIT["lengths"])
    result = prepack.prefill(model, seqs, token_budget=SPLIT["token_budget"])
    assert result.steps > 1
    assert (result.logits - oracle.alone_last_logits(model, seqs)).abs().max() <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_every_cpu_backend_gives_exact_logits(arch, backend):
    model, seqs = build(arch), prompts(CASES["mixed"])
    result = prepack.prefill(model, seqs, backend=backend)
    assert result.backend == backend  # the kernel that ran
    assert (result.logits - oracle.alone_last_logits(model, seqs)).abs().max() <= TOL


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_each_cache_holds_what_a_solo_prefill_caches(arch):
    model, seqs = build(arch), prompts([7, 3, 11])
    caches = prepack.prefill(model, seqs).dynamic_caches
    _, alone_caches = oracle.alone(model, seqs)
    assert len(caches) == len(alone_caches) == len(seqs)
    for seq, mine, theirs in zip(seqs, caches, alone_caches, strict=True):
        assert mine.get_seq_length() == len(seq)
        assert oracle.cache_gap(mine, theirs) <= 1e-5


@pytest.mark.parametrize("case", ["mixed", "one_long_many_short"])
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_greedy_tokens_match_generate_on_each_prompt_alone(arch, case):
    model, seqs = build(arch), prompts(CASES[case])
    got = prepack.generate(model, seqs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    want = [oracle.alone_generate(model, s, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0) for s in seqs]
    assert len(got) == len(want)
    assert [g.tokens.tolist() for g in got] == want


def test_the_oracle_sees_a_wrong_answer():
    """The table's oracle is not vacuous: a prompt run beside another (no packing) differs from it alone."""
    model, seqs = build("llama"), prompts([6, 5])
    with torch.no_grad():
        together = model(torch.cat(seqs)[None]).logits[0, -1]
    assert (together - oracle.alone_last_logits(model, seqs)[1]).abs().max() > 1e-2


def test_chunked_attention_cuts_segments_that_continue_earlier_keys_at_chunk_boundaries():
    """A decode step's query sees its own chunk's keys only, however many keys the segment continues."""
    import numpy as np

    from prepack.executor.call import _chunk_pieces

    q, k = _chunk_pieces(np.array([2, 4, 0, 1]), np.array([7, 4, 5, 6]), 3)
    # [2 of 7]: keys 0-2 unseen, query 5 sees 3-5, query 6 sees 6; [4 of 4]: chunks 0-2 and 3;
    # [0 of 5]: a stretch of no request's keys; [1 of 6]: query 5 sees 3-5
    assert q.tolist() == [0, 1, 1, 3, 1, 0, 0, 1]
    assert k.tolist() == [3, 3, 1, 3, 1, 5, 3, 3]
