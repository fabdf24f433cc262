"""prepack.prefill: last-token logits and per-request KV caches equal running each prompt alone."""

import pytest
import torch
from transformers import DynamicCache

import prepack

from .models import alone_last_logits, build, cache_kwargs, left_pad, prompts

# architecture x case x backend exactness lives in test_exactness.py; these are prefill's own behaviours
from .test_exactness import CASES


@pytest.mark.parametrize("backend, kwargs", [("sdpa_varlen", {"token_budget": 32}), ("sdpa_masked", {"capacity": 30, "token_budget": 60})])
def test_more_requests_than_fit_in_one_row_are_split_into_micro_batches(backend, kwargs):
    model, seqs = build("qwen2"), prompts(CASES["mixed"])
    result = prepack.prefill(model, seqs, backend=backend, **kwargs)
    assert result.steps > 1
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


def test_decoding_from_a_per_request_cache_matches_a_full_forward():
    model, seqs = build("llama"), prompts([7, 3, 11])
    result = prepack.prefill(model, seqs)
    nxt = torch.tensor([[5]])
    for seq, cache in zip(seqs, result.dynamic_caches, strict=True):
        with torch.no_grad():
            step = model(nxt, **cache_kwargs(model, cache)).logits[0, -1]
            full = model(torch.cat([seq, nxt[0]])[None]).logits[0, -1]
        assert (step - full).abs().max() <= 1e-4


def test_left_padded_cache_matches_a_padded_prefill():
    model, seqs = build("mistral"), prompts([4, 9, 2])
    cache, mask = prepack.prefill(model, seqs).left_padded_cache()
    ids, want_mask = left_pad(seqs)
    assert torch.equal(mask, want_mask)
    padded = DynamicCache(config=model.config)
    positions = (want_mask.cumsum(-1) - 1).clamp(min=0)  # what model.generate derives from the mask
    with torch.no_grad():
        model(ids, attention_mask=want_mask, position_ids=positions, **cache_kwargs(model, padded))
    for mine, theirs in zip(cache.layers, padded.layers, strict=True):
        real = want_mask[:, -mine.keys.shape[2]:].bool()  # sliding layers keep only their window
        torch.testing.assert_close(mine.keys.transpose(1, 2)[real], theirs.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        assert (mine.keys.transpose(1, 2)[~real] == 0).all()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_flash_kvcache_layout_holds_each_prompt_at_its_seqlens(padding):
    model, seqs = build("llama"), prompts([4, 9, 2])
    result = prepack.prefill(model, seqs)
    kv = result.flash_kvcache(extra=5, padding=padding)
    assert kv.cache_seqlens.dtype == torch.int32
    assert kv.k_caches[0].shape == (3, 9 + 5, 2, 16)  # (N, L_pad, H_kv, D)
    for i, cache in enumerate(result.dynamic_caches):
        start = 0 if padding == "right" else int(kv.cache_leftpad[i])
        end = int(kv.cache_seqlens[i])
        assert end - start == len(seqs[i])
        torch.testing.assert_close(kv.k_caches[1][i, start:end], cache.layers[1].keys[0].transpose(0, 1))
        torch.testing.assert_close(kv.v_caches[1][i, start:end], cache.layers[1].values[0].transpose(0, 1))
    assert (kv.cache_leftpad is None) == (padding == "right")


def test_flash_kvcache_is_right_padded_by_default():
    result = prepack.prefill(build("llama"), prompts([4, 9, 2]))
    kv = result.flash_kvcache()
    assert kv.cache_seqlens.tolist() == [4, 9, 2] and kv.cache_leftpad is None


def test_plain_transformers_mixes_packed_prompts_when_a_cache_is_used():
    """Why prepack exists: packed position_ids are ignored once a cache is passed."""
    model, seqs = build("llama"), prompts([6, 5])
    flat = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        out = model(flat, position_ids=pos, **cache_kwargs(model, DynamicCache())).logits[0]
    last = out[torch.tensor([5, 10])]
    assert (last - alone_last_logits(model, seqs)).abs().max() > 1e-2  # the second prompt saw the first


def test_prefill_wraps_the_models_own_attention_implementation_while_it_runs():
    model = build("llama")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    prepack.prefill(model, prompts([3, 4]))
    assert seen == ["prepack|sdpa"]
    assert model.config._attn_implementation == "sdpa"  # as the user left it


def test_no_prompts_give_an_empty_result_with_n_by_v_logits():
    result = prepack.prefill(build("llama"), [])
    assert result.logits.shape == (0, 128) and result.logits.dtype == torch.float32
    assert result.dynamic_caches == []


def test_empty_prompt_error_names_the_request():
    with pytest.raises(ValueError, match="request 1 is empty"):
        prepack.prefill(build("llama"), [[1, 2], []])


def test_prompt_longer_than_max_position_embeddings_is_rejected():
    with pytest.raises(ValueError, match="request 0 has 300 tokens but the model's max_position_embeddings is 256"):
        prepack.prefill(build("llama"), [[1] * 300])


def test_token_id_outside_the_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="request 0 has token id 500 but the model's vocab_size is 128"):
        prepack.prefill(build("llama"), [[1, 500]])


def test_token_budget_below_the_longest_prompt_is_rejected_by_the_row_backend():
    with pytest.raises(ValueError, match="request 1 has 12 tokens but token_budget is 8, and backend 'sdpa_masked'"):
        prepack.prefill(build("llama"), prompts([3, 12]), token_budget=8, backend="sdpa_masked")


def test_encoder_decoder_model_is_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64, d_kv=8))
    with pytest.raises(TypeError, match="encoder-decoder model"):
        prepack.prefill(model, [[1, 2]])


def test_model_without_attention_interface_is_rejected():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                           attention_types=[[["global"], 1]])).eval()  # hard-wired attention
    with pytest.raises(TypeError, match="does not route attention through transformers' AttentionInterface"):
        prepack.prefill(model, [[1, 2]])


def test_a_model_transformers_does_not_mark_is_rejected_unless_its_attention_class_is_verified():
    model = build("llama")
    model._supports_attention_backend = False  # as for BART-family decoders, whose positions ignore position_ids
    with pytest.raises(TypeError, match=r"has not verified its attention class \(LlamaAttention"):
        prepack.prefill(model, [[1, 2]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_prompt_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="request 0 is on cuda:0 but the model is on cpu"):
        prepack.prefill(build("llama"), [torch.tensor([1, 2], device="cuda")])


def test_prompt_on_another_device_is_rejected_on_cpu_only_machines():
    with pytest.raises(ValueError, match="request 1 is on meta but the model is on cpu"):
        prepack.prefill(build("llama"), [torch.tensor([1, 2]), torch.tensor([1, 2], device="meta")])


def test_flash_backend_without_cuda_names_the_fix():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(RuntimeError, match="backend='flash' needs a CUDA GPU"):
        prepack.prefill(build("llama"), [[1, 2]], backend="flash")


def test_capacity_is_refused_by_varlen_backends_that_have_no_rows():
    with pytest.raises(ValueError, match="capacity applies to backend='sdpa_masked'.*token_budget instead"):
        prepack.prefill(build("llama"), prompts([3, 4]), backend="sdpa_varlen", capacity=16)


def test_a_row_larger_than_the_token_budget_is_refused():
    with pytest.raises(ValueError, match="capacity 32 exceeds token_budget 16"):
        prepack.prefill(build("llama"), prompts([3, 4]), backend="sdpa_masked", capacity=32, token_budget=16)


def test_masked_prefill_keeps_each_forward_within_the_token_budget():
    model, seqs = build("llama"), prompts(CASES["mixed"])
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    result = prepack.prefill(model, seqs, backend="sdpa_masked", capacity=30, token_budget=60)
    hook.remove()
    assert max(seen) <= 60 and len(seen) > 1
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "fastest"}, "unknown attention backend 'fastest'"),
    ({"token_budget": 0}, "token_budget must be a positive integer"),
    ({"token_budget": 2.5}, "token_budget must be a positive integer"),
])
def test_bad_arguments_are_rejected_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepack.prefill(build("llama"), prompts([3, 4]), **kwargs)


def test_the_deprecated_batch_holds_each_requests_last_piece_where_it_ran():
    model, seqs = build("llama"), prompts([5, 9, 3, 7])
    result = prepack.prefill(model, seqs, token_budget=8)  # the 9-token prompt runs in two pieces
    with pytest.deprecated_call(match="PrefillResult.batch is deprecated"):
        batch = result.batch
    assert batch.num_rows == result.steps  # one varlen stream per step
    for i, seq in enumerate(seqs):
        piece = batch.plan.lengths[i]
        row, offset = batch.plan.row[i], batch.plan.offset[i]
        assert torch.equal(batch.input_ids[row, offset : offset + piece], seq[-piece:])
