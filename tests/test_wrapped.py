"""Wrapped models: PEFT adapters, torch.compile, forward hooks and replaced forwards are exact in every entry point.

The oracle is the wrapped model itself run on each request alone (for ``torch.compile``, the
module it compiles: the same function, without compiling it in a unit test).
"""

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

import prepack

from .models import COMMON, build, prompts

LENGTHS = [5, 17, 3, 12]
TOL = 1e-4
WRAPPERS = ["lora", "ia3", "compile", "hook", "replaced_forward"]  # LoHa: test_an_adapter..., test_prefill_...


def _peft(model, config):
    torch.manual_seed(1)
    return get_peft_model(model, config).eval()


def wrap(kind: str, model):
    """(what the user passes, what computes it alone)."""
    targets = ["q_proj", "v_proj", "down_proj"]
    if kind == "lora":  # init_lora_weights=False: a non-zero update, so an adapter that does not apply shows
        w = _peft(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    elif kind == "ia3":
        w = _peft(model, IA3Config(target_modules=targets, feedforward_modules=["down_proj"], init_ia3_weights=False))
    elif kind == "loha":
        w = _peft(model, LoHaConfig(r=4, target_modules=targets, init_weights=False))
    elif kind == "compile":
        return torch.compile(model), model
    elif kind == "hook":  # a hook on a layer (every path) and one on the whole model (its logits)
        model.model.layers[0].register_forward_hook(lambda m, args, out: out * 1.5)
        model.register_forward_hook(lambda m, args, out: out.__class__(**{**out, "logits": out.logits + 0.25})
                                    if getattr(out, "logits", None) is not None else out)
        w = model
    elif kind == "replaced_forward":
        orig = model.forward
        model.forward = lambda *a, **k: orig(*a, **k)
        w = model
    else:
        raise ValueError(kind)
    return w, w


@pytest.fixture(params=WRAPPERS)
def wrapped(request):
    return wrap(request.param, build("llama"))


def alone_logits(model, seqs):
    with torch.no_grad():
        return torch.stack([model(input_ids=s[None]).logits[0, -1] for s in seqs])


def test_an_adapter_changes_the_model_so_these_tests_can_fail():
    base = build("llama")
    seqs = prompts([6])
    plain = alone_logits(base, seqs)
    for kind in ("lora", "ia3", "loha", "hook"):
        w, oracle = wrap(kind, build("llama"))
        assert (alone_logits(oracle, seqs) - plain).abs().max() > 1e-3, kind


@pytest.mark.parametrize("kind", [*WRAPPERS, "loha"])
def test_prefill_logits_and_caches_match_each_prompt_alone(kind):
    model, oracle = wrap(kind, build("llama"))
    seqs = prompts(LENGTHS)
    result = prepack.prefill(model, seqs)
    assert (result.logits - alone_logits(oracle, seqs)).abs().max() <= TOL
    with torch.no_grad():
        alone = oracle(input_ids=seqs[1][None], use_cache=True).past_key_values
    assert (result.dynamic_caches[1].layers[1].keys - alone.layers[1].keys).abs().max() <= TOL


def test_generate_matches_each_prompt_generated_alone(wrapped):
    model, oracle = wrapped
    seqs = prompts(LENGTHS)
    got = prepack.generate(model, seqs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(got) == len(seqs)
    for s, g in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = oracle.generate(input_ids=s[None], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert g.tokens.tolist() == want[0, len(s):].tolist()


def _logprob(oracle, ctx, cont):
    ids = torch.tensor(ctx + cont)[None, :-1]
    with torch.no_grad():
        lp = torch.log_softmax(oracle(input_ids=ids).logits[0].double(), -1)
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_score_matches_each_request_alone(wrapped):
    model, oracle = wrapped
    ctx = prompts([7])[0].tolist()
    conts = [prompts([3], seed=1)[0].tolist(), prompts([5], seed=2)[0].tolist()]  # a shared context
    got = prepack.score(model, [(ctx, c) for c in conts])
    assert len(got) == len(conts)
    for c, s in zip(conts, got, strict=True):
        assert abs(s.logprob - _logprob(oracle, ctx, c)) <= TOL


def test_score_rolling_matches_the_windows_scored_alone(wrapped):
    model, oracle = wrapped
    doc = prompts([20])[0].tolist()
    got = prepack.score_rolling(model, [doc], prefix_token_id=1, max_length=8)
    want = sum(_logprob(oracle, ctx, cont) for ctx, cont in prepack.jobs.scoring.rolling_windows(doc, 1, 8))
    assert len(got) == 1 and abs(got[0] - want) <= TOL


def test_forward_at_all_positions_matches_each_request_alone(wrapped):
    model, oracle = wrapped
    seqs = prompts(LENGTHS)
    got = prepack.forward_at(model, seqs, "all")
    assert len(got) == len(seqs)
    for s, g in zip(seqs, got, strict=True):
        with torch.no_grad():
            assert (g - oracle(input_ids=s[None]).logits[0]).abs().max() <= TOL


def test_embed_matches_the_base_models_hidden_states_alone(wrapped):
    model, oracle = wrapped
    seqs = prompts(LENGTHS)
    got = prepack.embed(model, seqs, pooling="mean")
    with torch.no_grad():
        base = oracle.get_base_model() if hasattr(oracle, "get_base_model") else oracle
        want = torch.stack([base.model(input_ids=s[None]).last_hidden_state[0].mean(0) for s in seqs])
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["lora", "ia3", "compile", "replaced_forward"])
def test_classify_matches_the_wrapped_classifier_alone(kind):
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=2, pad_token_id=0)).eval()
    model, oracle = wrap(kind, clf)
    seqs = prompts(LENGTHS)
    got = prepack.classify(model, seqs)
    with torch.no_grad():
        want = torch.cat([oracle(input_ids=s[None]).logits for s in seqs])
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


def test_generate_refuses_a_model_that_is_not_a_causal_lm():
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=2, pad_token_id=0)).eval()
    with pytest.raises(TypeError, match="LlamaForSequenceClassification is not a causal language model"):
        prepack.generate(clf, prompts([4]), max_new_tokens=2)


def test_prompt_learning_adapters_are_refused():
    from peft import PromptTuningConfig

    model = get_peft_model(build("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(prepack.UnsupportedModelError, match="prompt-learning adapter"):
        prepack.prefill(model, prompts([4]))


def test_lm_eval_backend_scores_a_lora_model_as_lm_evals_own_hf_model():
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from prepack.lm_eval import PrepackLM

    vocab = {f"w{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w3")), bos_token="w1", eos_token="w2", pad_token="w0"
    )
    model, _ = wrap("lora", build("llama"))
    requests = [(None, [1, *p[:5].tolist()], p[5:].tolist()) for p in prompts([9, 14, 7])]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=1)._loglikelihood_tokens(requests)
    got = PrepackLM(pretrained=model, tokenizer=tok)._loglikelihood_tokens(requests)
    assert len(got) == len(want)
    for (lp, greedy), (lp0, greedy0) in zip(got, want, strict=True):
        assert abs(lp - lp0) <= TOL and greedy == greedy0


def test_a_model_in_train_mode_with_dropout_is_refused():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**COMMON, attention_dropout=0.1, num_labels=2)).train()
    with pytest.raises(prepack.UnsupportedModelError, match="train mode with attention_dropout=0.1"):
        prepack.embed(model, prompts([4]))


def test_a_model_in_train_mode_without_dropout_is_exact_with_a_warning():
    model = build("llama").train()
    seqs = prompts(LENGTHS)
    with pytest.warns(UserWarning, match="train mode"):
        got = prepack.prefill(model, seqs).logits
    assert (got - alone_logits(model, seqs)).abs().max() <= TOL
