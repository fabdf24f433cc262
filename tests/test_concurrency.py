"""A packed call changes nothing that another caller of the same model (or of its config) can observe.

Servers share one model across request threads: several threads prefilling at once, or one
prefilling while another runs the model plainly, must each get the answer they would get alone.
Each race below failed on the version that switched the config per call (7-12 of 80 plain eager
calls wrong, 2-9 of 40 shared-config prefills wrong, threaded generate differing).
"""

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prepack
from prepack.hf import registration as hf

from .models import COMMON, alone_last_logits, build, left_pad, prompts


def run_threads(target, n: int) -> None:
    """Run ``target(i)`` in n threads; re-raise the first worker's exception here, so a failing worker fails the test."""
    errors, threads = [], []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    for i in range(n):
        threads.append(threading.Thread(target=wrapped, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_run_threads_fails_when_a_worker_raises():
    def work(i):
        if i == 1:
            raise RuntimeError("worker 1 failed")

    with pytest.raises(RuntimeError, match="worker 1 failed"):
        run_threads(work, 3)


def test_threads_prefilling_through_one_model_each_get_exact_logits():
    model = build("qwen2")
    batches = [prompts([1 + (7 * i + j) % 40 for j in range(12)], seed=i) for i in range(4)]
    want = [alone_last_logits(model, seqs) for seqs in batches]
    worst = [0.0] * 4

    def work(i):
        for _ in range(3):
            got = prepack.prefill(model, batches[i]).logits
            assert got.shape == want[i].shape
            worst[i] = max(worst[i], float((got - want[i]).abs().max()))

    run_threads(work, 4)
    assert max(worst) <= 1e-4


def _plain_calls_during_prefills(model, calls: int) -> list[float]:
    """``calls`` plain padded forwards in one thread while two threads prefill: |diff| to the plain answer."""
    seqs = prompts([5, 19, 11, 2])
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_unpadded = model(seqs[1][None]).logits
    stop, diffs = threading.Event(), []

    def packer(_):
        while not stop.is_set():
            prepack.prefill(model, prompts([30, 3, 17, 8, 1]))

    def plain(_):
        try:
            for _ in range(calls // 2):
                diffs.extend(_plain_diffs(model, ids, mask, seqs[1], want, want_unpadded))
        finally:
            stop.set()

    run_threads(lambda i: plain(i) if i == 0 else packer(i), 3)
    return diffs


@pytest.mark.parametrize("arch,implementation", [("llama", "eager"), ("gemma2", "eager"), ("mistral", "sdpa")])
def test_plain_calls_during_packed_prefills_get_their_own_answer(arch, implementation):
    model = build(arch)
    model.set_attn_implementation(implementation)
    diffs = _plain_calls_during_prefills(model, 80)
    assert len(diffs) == 80
    assert max(diffs) == 0.0  # the very same computation: the wrapped implementation, its own mask


def test_two_models_sharing_one_config_prefill_exactly_from_two_threads():
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON)
    config._attn_implementation = "eager"
    models = [LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()]
    assert models[0].config is models[1].config
    seqs = [prompts([3 + (5 * j + i) % 29 for j in range(6)], seed=i) for i in range(2)]
    want = [alone_last_logits(m, s) for m, s in zip(models, seqs, strict=True)]
    diffs = [[], []]

    def work(i):
        for _ in range(20):
            got = prepack.prefill(models[i], seqs[i]).logits
            diffs[i].append(float((got - want[i]).abs().max()))
            with torch.no_grad():  # a plain call on the model that shares the config, between prefills
                plain = models[1 - i](seqs[1 - i][0][None]).logits[0, -1]
            diffs[i].append(float((plain - want[1 - i][0]).abs().max()))

    run_threads(work, 2)
    assert [len(d) for d in diffs] == [40, 40]
    assert max(max(d) for d in diffs) <= 1e-4


def test_threaded_generate_on_one_eager_model_gives_the_single_threaded_tokens():
    model = build("llama")
    model.set_attn_implementation("eager")
    batches = [prompts([4 + (3 * i + j) % 17 for j in range(5)], seed=i) for i in range(3)]
    want = [prepack.generate(model, b, max_new_tokens=6, do_sample=False) for b in batches]
    got = [[None] * 5 for _ in range(3)]

    def work(i):
        for r in range(5):
            got[i][r] = prepack.generate(model, batches[i], max_new_tokens=6, do_sample=False)

    run_threads(work, 3)
    for i in range(3):
        for r in range(5):
            assert len(got[i][r]) == len(want[i])
            for g, w in zip(got[i][r], want[i], strict=True):
                assert g.tokens.tolist() == w.tokens.tolist()


def test_enable_is_visible_idempotent_and_reversible():
    model = build("llama")
    model.set_attn_implementation("eager")
    prepack.enable(model)
    assert model.config._attn_implementation == "prepack|eager"
    prepack.enable(model)  # idempotent: nothing wraps twice
    assert model.config._attn_implementation == "prepack|eager"
    prepack.prefill(model, prompts([3, 4]))
    assert model.config._attn_implementation == "prepack|eager"  # no call writes to the config
    prepack.disable(model)
    assert model.config._attn_implementation == "eager"


def test_a_packed_call_writes_nothing_to_an_enabled_model(monkeypatch):
    model = prepack.enable(build("llama"))

    def no_switch(self, *args, **kwargs):
        raise AssertionError("a packed call switched the attention implementation")

    monkeypatch.setattr(type(model), "set_attn_implementation", no_switch)
    before = {k: v for k, v in vars(model.config).items()}
    prepack.prefill(model, prompts([3, 4, 9]))
    prepack.generate(model, prompts([3, 4]), max_new_tokens=2, do_sample=False)
    assert vars(model.config) == before


def test_plain_prepack_implementation_is_sdpa_for_unpacked_calls():
    model = build("mistral")
    seqs = prompts([5, 19, 11, 2])
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
        got = model(ids, attention_mask=mask).logits
    assert hf.wrapped_implementation(model.config._attn_implementation) == "sdpa"
    assert torch.equal(got, want)


def test_padding_free_training_builds_no_dense_mask(monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense mask was built for a padding-free batch")

    for name in ("sdpa", "eager"):
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, no_dense_mask)
    model = build("mistral").train()
    model.set_attn_implementation("prepack")
    batch = prepack.to_flash_kwargs([
        {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12], "position_ids": [0, 1, 2, 3, 4, 5, 6, 7]},
        {"input_ids": [13, 14, 15, 16], "position_ids": [0, 1, 0, 1]},
    ])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_packed_prefill_builds_no_dense_mask(monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense mask was built for a packed prefill")

    model = build("mistral")
    model.set_attn_implementation("eager")
    prepack.enable(model)
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "eager", no_dense_mask)
    seqs = prompts([9, 4, 12])
    result = prepack.prefill(model, seqs)
    assert result.logits.shape == (3, model.config.vocab_size)


def test_image_token_blocks_keep_the_wrapped_mask():
    """A mask overlay transformers adds without vmap (Gemma 3's image blocks) is the wrapped implementation's."""
    from transformers.masking_utils import create_causal_mask

    model = build("llama")
    embeds = torch.zeros(1, 6, COMMON["hidden_size"])
    blocks = torch.tensor([[-1, 0, 0, 0, -1, -1]])
    want = create_causal_mask(model.config, embeds, None, None, block_sequence_ids=blocks, allow_is_causal_skip=False)
    prepack.enable(model)
    got = create_causal_mask(model.config, embeds, None, None, block_sequence_ids=blocks, allow_is_causal_skip=False)
    assert want is not None and got is not None
    assert torch.equal(got, want)


def test_overlapping_packed_calls_from_two_threads_share_one_switch_and_let_go():
    """Two generate_iter streams on one model hold the switch at once; plain calls between their items get
    their own answer; the count returns to zero and the model to the user's implementation."""
    model = build("llama")
    model.set_attn_implementation("eager")
    batches = [prompts([4 + (3 * i + j) % 11 for j in range(4)], seed=i) for i in range(2)]
    want = [prepack.generate(model, b, max_new_tokens=5, do_sample=False) for b in batches]
    seq = prompts([9], seed=7)[0]
    with torch.no_grad():
        plain_want = model(seq[None]).logits
    both_holding = threading.Barrier(2)
    counts, plain_diffs, got = [], [], [None, None]

    def work(i):
        stream = prepack.generate_iter(model, batches[i], max_new_tokens=5, do_sample=False)
        first = next(stream)
        both_holding.wait()
        counts.append(hf.holds(model))
        with torch.no_grad():  # a plain call while both streams hold the switch
            plain_diffs.append(float((model(seq[None]).logits - plain_want).abs().max()))
        both_holding.wait()
        got[i] = [first, *stream]

    run_threads(work, 2)
    assert counts == [(2, False), (2, False)]
    assert plain_diffs == [0.0, 0.0]
    for g, w in zip(got, want, strict=True):
        assert [t.tokens.tolist() for t in g] == [t.tokens.tolist() for t in w]
    assert hf.holds(model) == (0, False)
    assert model.config._attn_implementation == "eager"


def test_plain_calls_while_prefills_switch_the_model_on_and_off_get_their_own_answer(monkeypatch):
    """One thread prefills in a loop, so the switch is set and set back around every prefill; another runs plain
    calls until it has seen at least 10 switches: a plain call whose mask was built before a change and whose
    layers run after it still computes what the model's own implementation computes."""
    model = build("mistral")  # a sliding window: a missing mask would be wrong, not just slow
    model.set_attn_implementation("eager")
    seqs = prompts([5, 19, 11, 2])
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_unpadded = model(seqs[1][None]).logits
    switches, diffs, stop = [], [], threading.Event()
    original = type(model).set_attn_implementation

    def counted(self, *args, **kwargs):
        switches.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "set_attn_implementation", counted)

    def packer():
        while not stop.is_set():
            prepack.prefill(model, prompts([30, 3, 17, 8, 1]))

    def plain():
        try:
            while len(switches) < 10 or len(diffs) < 40:
                diffs.extend(_plain_diffs(model, ids, mask, seqs[1], want, want_unpadded))
        finally:
            stop.set()

    run_threads(lambda i: plain() if i == 0 else packer(), 2)
    assert len(switches) >= 10 and max(diffs) == 0.0
    assert model.config._attn_implementation == "eager"


def _plain_diffs(model, ids, mask, one, want, want_unpadded) -> list[float]:
    """Plain calls (a padded batch, one unpadded sequence) against their answers computed before any prepack call."""
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        got_unpadded = model(one[None]).logits
    return [float((got - want)[mask.bool()].abs().max()), float((got_unpadded - want_unpadded).abs().max())]
