"""prepack.classify and prepack.embed: a head on each request's own tokens, exact without padding."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

import prepack

from .models import COMMON, build, left_pad, prompts

LENGTHS = [1, 5, 17, 3, 30, 12]


def classifier(arch: str = "llama", *, pad_token_id=0, num_labels: int = 3):
    torch.manual_seed(0)
    if arch == "gemma2":
        config = Gemma2Config(**COMMON, head_dim=16, sliding_window=6, attn_logit_softcapping=30.0, query_pre_attn_scalar=20,
                              num_labels=num_labels, pad_token_id=pad_token_id)
        return Gemma2ForSequenceClassification(config).eval()
    return LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=num_labels, pad_token_id=pad_token_id)).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_classification_matches_the_models_own_padded_forward(arch, padding):
    model, seqs = classifier(arch), prompts(LENGTHS)  # prompt ids are >= 3: never the pad id 0
    if padding == "left":
        ids, mask = left_pad(seqs)
    else:
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
        mask = (ids != 0).long()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    got = prepack.classify(model, seqs)
    assert got.shape == (len(seqs), 3)
    assert (got - want).abs().max() <= 1e-4


def test_classification_needs_no_pad_token():
    model, seqs = classifier(pad_token_id=None, num_labels=1), prompts(LENGTHS)  # a reward model
    with torch.no_grad():
        want = torch.cat([model(s[None]).logits for s in seqs])  # transformers refuses a batch without a pad token
    got = prepack.classify(model, seqs, token_budget=32)
    assert (got - want).abs().max() <= 1e-4


def test_classify_refuses_a_model_without_a_classification_head():
    with pytest.raises(TypeError, match="LlamaForCausalLM has no sequence-classification head.*prepack.score"):
        prepack.classify(build("llama"), prompts([3]))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_mean_pooled_embeddings_match_each_request_alone(arch):
    model, seqs = build(arch), prompts(LENGTHS)
    with torch.no_grad():
        want = torch.stack([model.model(s[None]).last_hidden_state[0].mean(0) for s in seqs])
    got = prepack.embed(model, seqs, pooling="mean", token_budget=40)
    assert (got - want).abs().max() <= 1e-4


def test_last_token_embeddings_match_each_request_alone_and_normalize():
    model, seqs = build("qwen2"), prompts(LENGTHS)
    with torch.no_grad():
        want = torch.stack([model.model(s[None]).last_hidden_state[0, -1] for s in seqs])
    got = prepack.embed(model, seqs, pooling="last", normalize=True)
    assert (got - torch.nn.functional.normalize(want, dim=-1)).abs().max() <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(seqs)))


def test_embeddings_of_a_classifier_use_its_base_model():
    model, seqs = classifier(), prompts([4, 9])
    with torch.no_grad():
        want = torch.stack([model.model(s[None]).last_hidden_state[0, -1] for s in seqs])
    assert (prepack.embed(model, seqs, pooling="last") - want).abs().max() <= 1e-4


def test_no_requests_give_zero_rows_of_num_labels():
    assert prepack.classify(classifier(num_labels=3), []).shape == (0, 3)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_no_requests_give_zero_embeddings_of_the_hidden_size(pooling):
    out = prepack.embed(build("llama"), [], pooling=pooling, normalize=True)
    assert out.shape == (0, 64) and out.dtype == torch.float32


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be 'last' or 'mean', got 'cls'"):
        prepack.embed(build("llama"), prompts([3]), pooling="cls")
