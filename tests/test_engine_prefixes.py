"""The decode engine holds a shared prompt prefix once and prefills long prompts in chunks, exactly."""

import numpy as np
import pytest
import torch

import prepack
from prepack.jobs.generation import generate_with_backends
from prepack.executor.kvstore import KVStore
from prepack.executor.call import StepLayout

from .models import VOCAB, build, prompts
from .test_generate import alone, tokens

SYSTEM = 40  # tokens of the shared system prompt (above prepack.executor.regions.MIN_SHARED_TOKENS)
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def chats(suffixes=(1, 5, 17, 3, 12), system=SYSTEM, seed=1):
    """Prompts that share a ``system``-token prefix, each followed by its own turn of ``suffixes[i]`` tokens."""
    head = torch.randint(3, VOCAB, (system,), generator=torch.Generator().manual_seed(seed))
    return [torch.cat([head, s]) for s in prompts(list(suffixes))]


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])  # MLA: keys and values of other widths
def test_chats_sharing_a_system_prompt_decode_what_generate_gives_each_alone(arch):
    model, seqs = build(arch), chats()
    got = generate_with_backends(model, seqs, **GREEDY)
    assert tokens(got.results) == alone(model, seqs, **GREEDY)
    assert got.stats.prefix_regions == 1
    assert got.stats.shared_prefix_tokens == SYSTEM * (len(seqs) - 1)  # computed once, not five times


def test_a_system_prompt_longer_than_the_token_budget_is_shared_and_chunked_exactly():
    model, seqs = build("llama"), chats()
    got = generate_with_backends(model, seqs, token_budget=16, **GREEDY)
    assert tokens(got.results) == alone(model, seqs, **GREEDY)
    assert got.stats.prefix_regions == 1 and max(got.stats.prompt_tokens) <= 16


def test_shared_prefix_logprobs_equal_the_unshared_path():
    model, seqs = build("llama"), chats()
    shared = prepack.generate(model, seqs, return_logprobs=True, **GREEDY)
    own = prepack.generate(model, seqs, return_logprobs=True, share_prefixes=False, **GREEDY)
    for a, b in zip(shared, own, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_seeded_samples_share_their_prompt_and_equal_the_unshared_path():
    model, seqs = build("llama"), prompts([36, 50, 41])
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, num_return_sequences=4, seed=7, pad_token_id=0,
                  return_logprobs=True)
    shared = generate_with_backends(model, seqs, **kwargs)
    own = generate_with_backends(model, seqs, share_prefixes=False, **kwargs)
    assert shared.stats.prefix_regions == len(seqs) and own.stats.prefix_regions == 0  # one region per prompt
    for a, b in zip(shared.results, own.results, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_a_shared_prefix_is_counted_once_in_the_live_keys():
    model, seqs = build("llama"), chats()
    kwargs = dict(GREEDY, min_new_tokens=GREEDY["max_new_tokens"])  # every request lives to the last step
    own_keys = sum(len(s) for s in seqs) + len(seqs) * (kwargs["max_new_tokens"] - 1)
    shared = generate_with_backends(model, seqs, **kwargs).stats
    unshared = generate_with_backends(model, seqs, share_prefixes=False, **kwargs).stats
    assert unshared.peak_live_tokens == own_keys
    assert shared.peak_live_tokens == own_keys - SYSTEM * (len(seqs) - 1)


def test_a_prefix_region_is_freed_with_its_last_request():
    store = KVStore("cpu")
    store.attach(0, -1)
    store.attach(1, -1)
    step = store.plan({-1: 8, 0: 2, 1: 3})
    for layer in range(2):
        step.extend(layer, torch.randn(1, 2, 13, 4), torch.randn(1, 2, 13, 4))
    assert store.live_tokens() == 13
    assert store.free(0) == [0] and store.live_tokens() == 11  # the prefix stays while request 1 reads it
    assert store.free(1) == [1, -1] and store.live_tokens() == 0 and not store.sharers


def test_share_prefixes_false_computes_every_prompt_on_its_own():
    model, seqs = build("llama"), chats()
    got = generate_with_backends(model, seqs, share_prefixes=False, **GREEDY)
    assert got.stats.prefix_regions == 0 and got.stats.shared_prefix_tokens == 0
    assert tokens(got.results) == alone(model, seqs, **GREEDY)


def test_a_sliding_window_model_shares_no_prefix_and_stays_exact():
    model, seqs = build("mistral"), chats()
    got = generate_with_backends(model, seqs, **GREEDY)
    assert got.stats.prefix_regions == 0
    assert tokens(got.results) == alone(model, seqs, **GREEDY)


def test_share_prefixes_must_be_a_bool():
    with pytest.raises(ValueError, match="share_prefixes must be True or False, got 'yes'"):
        prepack.generate(build("llama"), prompts([3]), max_new_tokens=2, share_prefixes="yes")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks_exactly(arch):
    model, seqs = build(arch), prompts([50, 7, 3])
    got = generate_with_backends(model, seqs, token_budget=16, **GREEDY)
    assert tokens(got.results) == alone(model, seqs, **GREEDY)
    assert max(got.stats.prompt_tokens) <= 16 and sum(got.stats.prompt_tokens) == 60


def test_decodes_continue_while_a_long_prompt_is_prefilled_in_chunks():
    model = build("llama")
    seqs = prompts([4, 5, 6, 7, 90])  # the long prompt waits until request 0 (2 new tokens) finishes
    new = [2, 12, 12, 12, 3]
    got = generate_with_backends(model, seqs, token_budget=16, max_batch=4, max_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
    want = [alone(model, [s], max_new_tokens=n, do_sample=False, pad_token_id=0)[0] for s, n in zip(seqs, new)]
    assert tokens(got.results) == want
    stats = got.stats
    chunk_steps = [i for i in range(1, stats.steps) if stats.prompt_tokens[i]]
    assert len(chunk_steps) >= 90 // 16  # the long prompt took several steps ...
    assert all(stats.decode_rows[i] == 3 for i in chunk_steps)  # ... each beside the three running decodes


def test_attention_over_a_prefix_region_and_own_keys_matches_flash_attn_reference():
    """The merged parts equal flash-attn's ``attention_ref`` over each request's keys laid end to end."""
    from prepack.attention.cascade import cascade_kernel, shared_parts
    from prepack.attention.registry import choose

    from .flash_attn_reference import attention_ref

    g = torch.Generator().manual_seed(0)
    pool_k, pool_v = torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    q = torch.randn(1 + 3 + 2, 4, 8, generator=g)  # a decode row, a 3-token chunk, an unshared 2-token prompt
    # pool rows: prefix [0, 10), request 0 [12, 17), request 1 [20, 26), request 2 [30, 32)
    order, starts = [0, 1, 2], np.array([12, 20, 30])
    q_len, cached = np.array([1, 3, 2]), np.array([4, 3, 0])
    parts = shared_parts(order, q_len, cached, starts, {0: [-1], 1: [-1]}, {-1: (0, 10)}, "cpu")
    base = StepLayout(np.array([0, 1, 0, 3, 0, 2]), np.array([17, 0, 9, 0, 4, 2]), "cpu")  # 0 and 1: keyless
    kernel = cascade_kernel(choose("sdpa_varlen", device="cpu", dtype=torch.float32), parts, base)
    got = kernel.fn(q, pool_k, pool_v, None, None, causal=True)
    keys = [torch.cat([pool_k[0:10], pool_k[12:17]]), torch.cat([pool_k[0:10], pool_k[20:26]]), pool_k[30:32]]
    values = [torch.cat([pool_v[0:10], pool_v[12:17]]), torch.cat([pool_v[0:10], pool_v[20:26]]), pool_v[30:32]]
    rows = [slice(0, 1), slice(1, 4), slice(4, 6)]
    for r, kk, vv in zip(rows, keys, values, strict=True):
        want = attention_ref(q[None, r], kk[None], vv[None], causal=True)[0]
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)


def _generate_counting(model, seqs, **kwargs):
    """generate_with_backends, and how many token positions went through the model (a hook on its input embeddings)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        return generate_with_backends(model, seqs, **kwargs), sum(seen)
    finally:
        handle.remove()


SAMPLED = dict(do_sample=True, top_k=20, pad_token_id=0, max_new_tokens=5, min_new_tokens=5)


def test_samples_of_a_short_prompt_run_its_tokens_once_and_equal_generate_alone():
    model, seqs, g = build("llama"), prompts([5, 9, 3]), 3
    got, tokens_run = _generate_counting(model, seqs, num_return_sequences=g, seed=11, **SAMPLED)
    # sample j of prompt i is request k = i * g + j, seeded 11 + k: generate on its prompt alone, seeded so
    assert tokens(got.results) == [alone_seeded(model, seqs[k // g], 11 + k) for k in range(len(seqs) * g)]
    # each prompt once, its last token included; then each sample feeds back all but its last new token
    assert tokens_run == sum(len(s) for s in seqs) + len(seqs) * g * (SAMPLED["max_new_tokens"] - 1)
    assert got.stats.prefix_regions == len(seqs)


def alone_seeded(model, prompt, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **SAMPLED)
    return out[0, len(prompt):].tolist()


def test_a_header_and_each_prompt_are_shared_at_two_levels_exactly():
    """A GRPO batch: a header shared by every prompt, each prompt shared by its samples, each computed once."""
    model, g = build("llama"), 3
    seqs = chats(suffixes=(1, 5, 40, 3), system=SYSTEM)
    got, tokens_run = _generate_counting(model, seqs, num_return_sequences=g, seed=5, **SAMPLED)
    assert tokens(got.results) == [alone_seeded(model, seqs[k // g], 5 + k) for k in range(len(seqs) * g)]
    prompt_tokens = SYSTEM + sum(len(s) - SYSTEM for s in seqs)  # the header once, each prompt's own tokens once
    assert tokens_run == prompt_tokens + len(seqs) * g * (SAMPLED["max_new_tokens"] - 1)
    assert got.stats.prefix_regions == 1 + len(seqs)  # the header, and one region per prompt under it


def test_two_level_sharing_keeps_every_key_once():
    model, g = build("llama"), 2
    seqs = chats(suffixes=(6, 9), system=SYSTEM)
    kwargs = dict(SAMPLED, num_return_sequences=g, seed=1)
    stats = generate_with_backends(model, seqs, **kwargs).stats
    own = g * len(seqs) * (kwargs["max_new_tokens"] - 1)  # every request's new tokens, all live at the last step
    assert stats.peak_live_tokens == SYSTEM + 6 + 9 + own


def test_a_region_tree_is_freed_from_the_leaves_with_its_last_reader():
    store = KVStore("cpu")
    store.attach(-2, -1)  # region -2 continues the header -1
    for request, region in ((0, -2), (1, -2), (2, -1)):
        store.attach(request, region)
    assert store.chain(0) == [-2, -1] and store.chain(2) == [-1]
    assert store.free(0) == [0]
    assert store.free(1) == [1, -2]  # -2 had no other reader; the header still has request 2
    assert store.free(2) == [2, -1] and not store.sharers and not store.prefix_of


def test_attention_over_two_nested_regions_and_own_keys_matches_flash_attn_reference():
    """A query reading a header region, a prompt region under it and its own keys: three merged parts."""
    from prepack.attention.registry import choose
    from prepack.attention.cascade import cascade_kernel, shared_parts

    from .flash_attn_reference import attention_ref

    gen = torch.Generator().manual_seed(1)
    pool_k, pool_v = torch.randn(40, 2, 8, generator=gen), torch.randn(40, 2, 8, generator=gen)
    q = torch.randn(1 + 3, 4, 8, generator=gen)  # a decode row (request 0), a 3-token chunk (request 1)
    # pool rows: header [0, 10), prompt region [10, 16), request 0 [20, 23), request 1 [30, 35)
    order, starts = [0, 1], np.array([20, 30])
    q_len, cached = np.array([1, 3]), np.array([2, 2])
    parts = shared_parts(order, q_len, cached, starts, {0: [-2, -1], 1: [-1]}, {-1: (0, 10), -2: (10, 6)}, "cpu")
    base = StepLayout(np.array([0, 1, 0, 3]), np.array([23, 0, 12, 0]), "cpu")  # both keyless: merged elsewhere
    kernel = cascade_kernel(choose("sdpa_varlen", device="cpu", dtype=torch.float32), parts, base)
    got = kernel.fn(q, pool_k, pool_v, None, None, causal=True)
    rows = {0: (slice(0, 1), [slice(0, 10), slice(10, 16), slice(20, 23)]), 1: (slice(1, 4), [slice(0, 10), slice(30, 35)])}
    for r, pieces in rows.values():
        kk, vv = torch.cat([pool_k[p] for p in pieces]), torch.cat([pool_v[p] for p in pieces])
        want = attention_ref(q[None, r], kk[None], vv[None], causal=True)[0]
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
