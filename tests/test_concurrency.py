"""A packed forward changes nothing that another caller of the same model can observe.

Servers share one model across request threads: several threads prefilling at once, or one
prefilling while another runs the model plainly, must each get the answer they would get alone.
"""

import threading

import pytest
import torch

import prepack
from prepack import hf

from .models import alone_last_logits, build, left_pad, prompts


def _run_threads(target, n):
    errors, threads = [], []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    for i in range(n):
        threads.append(threading.Thread(target=wrapped, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_prefilling_through_one_model_each_get_exact_logits():
    model = build("qwen2")
    batches = [prompts([1 + (7 * i + j) % 40 for j in range(12)], seed=i) for i in range(4)]
    want = [alone_last_logits(model, seqs) for seqs in batches]
    worst = [0.0] * 4

    def work(i):
        for _ in range(3):
            got = prepack.prefill(model, batches[i]).logits
            worst[i] = max(worst[i], float((got - want[i]).abs().max()))

    _run_threads(work, 4)
    assert max(worst) <= 1e-4
    assert model.config._attn_implementation == "sdpa"


def test_a_plain_forward_during_packed_prefills_gets_its_own_answer():
    model = build("mistral")  # a sliding window, so the mask matters
    seqs = prompts([5, 19, 11, 2])
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    stop = threading.Event()
    diffs = []

    def packer(_):
        while not stop.is_set():
            prepack.prefill(model, prompts([30, 3, 17, 8, 1]))

    def plain():
        for _ in range(10):
            with torch.no_grad():
                got = model(ids, attention_mask=mask).logits
            diffs.append(float((got - want)[mask.bool()].abs().max()))
        stop.set()

    side = threading.Thread(target=lambda: _run_threads(packer, 2))
    side.start()
    try:
        plain()
    finally:
        stop.set()
        side.join()
    assert max(diffs) <= 1e-5


def test_the_model_is_restored_when_the_forward_raises():
    model = build("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with hf.packed_forward(model):
            assert model.config._attn_implementation == "prepack"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not hf._SWITCHED and not hf._FALLBACK


def test_the_model_is_restored_when_switching_itself_raises(monkeypatch):
    model = build("llama")
    original = type(model).set_attn_implementation

    def half_switch(self, name, **kwargs):
        original(self, name, **kwargs)  # the change is made, then something fails
        raise RuntimeError("switch failed")

    monkeypatch.setattr(type(model), "set_attn_implementation", half_switch)
    with pytest.raises(RuntimeError, match="switch failed"):
        prepack.prefill(model, prompts([3, 4]))
    assert model.config._attn_implementation == "sdpa"
    assert not hf._SWITCHED and not hf._FALLBACK


def test_a_model_the_user_switched_to_prepack_stays_switched():
    model = build("llama")
    model.set_attn_implementation("prepack")
    prepack.prefill(model, prompts([3, 4]))
    assert model.config._attn_implementation == "prepack"


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
