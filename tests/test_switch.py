"""The attention switch is held only for a call: after an entry point returns the model is as the user left it.

Entry points hold a reference-counted switch for their own length (:func:`prepack.hf.registration.switched`);
``prepack.enable`` is the user's own switch, kept until ``prepack.disable``. Oracles: transformers'
``generate_batch`` and ``model.generate`` on the user's model, and its config as the user set it.
"""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import prepack
from prepack.hf import registration as hf

from .models import build, prompts


@pytest.fixture
def eager_llama():
    model = build("llama")
    model.set_attn_implementation("eager")
    return model


ENTRY_POINTS = {
    "prefill": lambda m, p: prepack.prefill(m, p),
    "prefill_shared_prefix": lambda m, p: prepack.prefill(m, [torch.cat([p[0], q]) for q in p]),
    "score": lambda m, p: prepack.score(m, [(q[:2], q[2:]) for q in p]),
    "generate": lambda m, p: prepack.generate(m, p, max_new_tokens=3, do_sample=False),
    "generate_iter": lambda m, p: list(prepack.generate_iter(m, p, max_new_tokens=3, do_sample=False)),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_leaves_the_users_implementation(eager_llama, entry):
    ENTRY_POINTS[entry](eager_llama, prompts([5, 9, 3]))
    assert eager_llama.config._attn_implementation == "eager"
    assert hf.holds(eager_llama) == (0, False)


def test_generate_iter_holds_the_switch_while_it_runs_and_lets_go_when_closed(eager_llama):
    stream = prepack.generate_iter(eager_llama, prompts([4, 6, 8]), max_new_tokens=3, do_sample=False)
    assert eager_llama.config._attn_implementation == "eager"  # nothing runs before the first item
    next(stream)
    assert eager_llama.config._attn_implementation == "prepack|eager"
    assert hf.holds(eager_llama) == (1, False)
    stream.close()
    assert eager_llama.config._attn_implementation == "eager"
    assert hf.holds(eager_llama) == (0, False)


def test_generate_iter_between_items_leaves_plain_calls_their_own_mask(eager_llama):
    seq = prompts([7])[0]
    with torch.no_grad():
        want = eager_llama(seq[None]).logits
    stream = prepack.generate_iter(eager_llama, prompts([4, 6]), max_new_tokens=2, do_sample=False)
    next(stream)
    with torch.no_grad():  # the switch is held, by the stream, not by this call
        got = eager_llama(seq[None]).logits
    assert torch.equal(got, want)
    list(stream)


def test_a_failing_call_lets_go_of_the_switch(eager_llama):
    with pytest.raises(ValueError):
        prepack.prefill(eager_llama, prompts([4, 5]), backend="no_such_backend")
    with pytest.raises(ValueError):
        prepack.generate(eager_llama, prompts([4, 5]), max_new_tokens=2, backend="no_such_backend")
    assert eager_llama.config._attn_implementation == "eager"
    assert hf.holds(eager_llama) == (0, False)


def test_enable_keeps_the_model_switched_across_calls_until_disable(eager_llama):
    prepack.enable(eager_llama)
    prepack.prefill(eager_llama, prompts([3, 4]))
    prepack.generate(eager_llama, prompts([3, 4]), max_new_tokens=2, do_sample=False)
    assert eager_llama.config._attn_implementation == "prepack|eager"
    prepack.disable(eager_llama)
    assert eager_llama.config._attn_implementation == "eager"


def test_a_model_loaded_switched_stays_switched(eager_llama):
    eager_llama.set_attn_implementation("prepack|eager")  # the user's choice, made without prepack.enable
    prepack.prefill(eager_llama, prompts([3, 4]))
    assert eager_llama.config._attn_implementation == "prepack|eager"


def test_disable_during_a_call_sets_back_when_the_call_returns(eager_llama):
    prepack.enable(eager_llama)
    stream = prepack.generate_iter(eager_llama, prompts([4, 6]), max_new_tokens=3, do_sample=False)
    next(stream)
    prepack.disable(eager_llama)
    assert eager_llama.config._attn_implementation == "prepack|eager"  # the stream still runs packed
    list(stream)
    assert eager_llama.config._attn_implementation == "eager"


def test_packed_call_on_a_model_not_switched_is_refused(eager_llama):
    with pytest.raises(RuntimeError, match="not switched to prepack's attention"):
        hf.require_switched(eager_llama)


def test_generate_batch_runs_after_prepack_calls_and_matches_model_generate():
    model = build("llama")
    seqs = prompts([5, 9])
    prepack.prefill(model, seqs)
    prepack.generate(model, seqs, max_new_tokens=2, do_sample=False)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=32, max_requests_per_batch=2)
    out = model.generate_batch(
        inputs=[s.tolist() for s in seqs], generation_config=config, continuous_batching_config=batching,
        progress_bar=False, warmup=False,
    )
    for i, s in enumerate(seqs):
        want = model.generate(s[None], max_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(s):]
        assert out[f"req_{i}"].generated_tokens == want.tolist()


def test_save_pretrained_after_prepack_calls_writes_the_users_model(tmp_path, eager_llama):
    """transformers 5.25 writes no implementation into config.json; a version that does must see the user's."""
    prepack.prefill(eager_llama, prompts([5, 9]))
    eager_llama.save_pretrained(tmp_path)
    assert "prepack" not in (tmp_path / "config.json").read_text()
    reloaded = type(eager_llama).from_pretrained(tmp_path, attn_implementation="eager").eval()
    seq = prompts([7])[0][None]
    with torch.no_grad():
        assert torch.equal(reloaded(seq).logits, eager_llama(seq).logits)
