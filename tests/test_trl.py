"""prepack.trl.rollout_func and prepack.logprobs against TRL's own GRPOTrainer path (TRL's functions are the oracles)."""

import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import prepack  # noqa: E402
import prepack.trl  # noqa: E402
from prepack.tiny import tiny_model_and_tokenizer  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PROMPTS = ["the quick brown fox", "hello", "the capital of france is", "a user asks a question and the"]
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS]
G = 3


def reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def trainer(model, tok, tmp_path, *, rollout=None, data=PROMPTS, **config):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=len(data) * G, num_generations=G, max_completion_length=12,
        max_steps=1, report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", temperature=0.7,
    )
    settings.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOTrainer(
            model=model, reward_funcs=reward, args=trl.GRPOConfig(**settings),
            train_dataset=datasets.Dataset.from_dict({"prompt": data}), processing_class=tok, rollout_func=rollout,
        )


def repeated(prompts):
    """The per-process prompts as TRL 1.16 hands them to generation: each num_generations times in a row."""
    return [p for p in prompts for _ in range(G)]


@pytest.fixture
def tiny():
    model, tok = tiny_model_and_tokenizer(seed=3)
    # a second EOS id the model declares (TRL ends completions at any of them), one this model often
    # produces, so that completions end at different lengths
    model.generation_config.eos_token_id = 11
    return model.train(), tok  # a policy in training, as the trainer holds it


def trl_logprobs(tr, model, prompt_ids, completion_ids):
    """TRL's own recomputation: left-padded prompts + right-padded completions through _get_per_token_logps_and_entropies."""
    from trl.trainer.utils import pad

    pad_id = tr.processing_class.pad_token_id
    p = pad([torch.tensor(x) for x in prompt_ids], padding_value=pad_id, padding_side="left")
    pm = pad([torch.ones(len(x), dtype=torch.long) for x in prompt_ids], padding_value=0, padding_side="left")
    c = pad([torch.tensor(x) for x in completion_ids], padding_value=pad_id, padding_side="right")
    cm = pad([torch.ones(len(x), dtype=torch.long) for x in completion_ids], padding_value=0, padding_side="right")
    with torch.no_grad():
        lp, ent, _ = tr._get_per_token_logps_and_entropies(
            model, torch.cat([p, c], 1), torch.cat([pm, cm], 1), c.shape[1], compute_entropy=True
        )
    return lp, ent, cm.bool()


@pytest.mark.parametrize("data", [PROMPTS, CHATS], ids=["text", "chat"])
def test_top_k_1_rollout_gives_trls_default_completions_token_for_token(tiny, tmp_path, data):
    model, tok = tiny
    theirs = trainer(model, tok, tmp_path, data=data, top_k=1)
    ours = trainer(model, tok, tmp_path, data=data, top_k=1, rollout=prepack.trl.rollout_func())
    t_prompt, t_completion, *_ = theirs._generate(repeated(data))
    o_prompt, o_completion, *_ = ours._generate(repeated(data))
    assert o_prompt == [list(x) for x in t_prompt]  # templated at the boundary exactly as TRL templates
    assert o_completion == t_completion
    if data is PROMPTS:  # some stop at the second EOS id: the cut after EOS is checked too
        assert len({len(c) for c in o_completion}) > 1


def test_greedy_rollout_gives_trls_default_completions(tiny, tmp_path):
    model, tok = tiny
    kwargs = dict(generation_kwargs={"do_sample": False}, repetition_penalty=1.3)
    theirs = trainer(model, tok, tmp_path, **kwargs)
    ours = trainer(model, tok, tmp_path, rollout=prepack.trl.rollout_func(), **kwargs)
    assert ours._generate(repeated(PROMPTS))[1] == theirs._generate(repeated(PROMPTS))[1]


@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=20, min_p=0.05),
                                      dict(temperature=0.6, generation_kwargs={"do_sample": False})])
def test_rollout_logprobs_equal_trls_recomputation(tiny, tmp_path, sampling):
    model, tok = tiny
    tr = trainer(model, tok, tmp_path, rollout=prepack.trl.rollout_func(seed=5), **sampling)
    out = tr.rollout_func(repeated(PROMPTS), tr)
    assert [len(x) for x in out["logprobs"]] == [len(x) for x in out["completion_ids"]]
    theirs, _, mask = trl_logprobs(tr, model, out["prompt_ids"], out["completion_ids"])
    ours = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in out["logprobs"]], batch_first=True)
    assert ours.shape == theirs.shape
    assert (ours - theirs)[mask].abs().max() <= 1e-5
    assert model.training  # the mode it found


def test_seeded_rollouts_repeat_and_do_not_depend_on_batching(tiny, tmp_path):
    model, tok = tiny
    tr = trainer(model, tok, tmp_path, top_p=0.9)
    whole = prepack.trl.rollout_func(seed=11)(repeated(PROMPTS), tr)
    assert prepack.trl.rollout_func(seed=11)(repeated(PROMPTS), tr) == whole
    one_by_one = prepack.trl.rollout_func(seed=11, max_batch=1, token_budget=8)(repeated(PROMPTS), tr)
    assert one_by_one["completion_ids"] == whole["completion_ids"]
    for a, b in zip(one_by_one["logprobs"], whole["logprobs"], strict=True):  # other shapes round differently
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert prepack.trl.rollout_func(seed=12)(repeated(PROMPTS), tr)["completion_ids"] != whole["completion_ids"]
    samples = whole["completion_ids"][:G]
    assert len({tuple(s) for s in samples}) > 1  # a prompt's samples draw apart


def test_prompts_given_once_get_num_generations_completions_each(tiny, tmp_path):
    model, tok = tiny
    tr = trainer(model, tok, tmp_path)
    rollout = prepack.trl.rollout_func(seed=2)
    once, repeats = rollout(PROMPTS, tr), rollout(repeated(PROMPTS), tr)
    assert once == repeats  # the same requests, numbered prompt-major
    assert len(once["completion_ids"]) == G * len(PROMPTS)


def test_prompts_repeated_unevenly_keep_one_completion_per_entry(tiny, tmp_path):
    model, tok = tiny
    tr = trainer(model, tok, tmp_path, top_k=1)
    prompts = repeated(PROMPTS[:1]) * 2 + repeated(PROMPTS[1:2])  # a prompt twice in a row in the data
    out = prepack.trl.rollout_func()(prompts, tr)
    assert len(out["completion_ids"]) == len(prompts)
    assert len({tuple(c) for c in out["completion_ids"][: 2 * G]}) == 1  # top_k=1: one completion per prompt


def test_rollout_restores_eval_mode_and_attention(tiny, tmp_path):
    model, tok = tiny
    model.eval()
    tr = trainer(model, tok, tmp_path)
    before = model.config._attn_implementation
    prepack.trl.rollout_func(seed=0)(repeated(PROMPTS), tr)
    assert not model.training and model.config._attn_implementation == before


def test_grpo_training_step_runs_with_the_rollout_and_every_trl_path_runs_after_it(tiny, tmp_path):
    model, tok = tiny
    tr = trainer(model, tok, tmp_path, rollout=prepack.trl.rollout_func(seed=0), max_steps=2)
    weights = model.lm_head.weight.detach().clone()
    tr.train()
    assert not torch.equal(weights, model.lm_head.weight)  # the policy learned from prepack's rollouts
    assert tr.state.global_step == 2 and model.training
    # after prepack ran on it, TRL's default and continuous-batching paths still take the model
    default = trainer(model, tok, tmp_path, top_k=1)
    assert len(default._generate(repeated(PROMPTS[:2]))[1]) == 2 * G
    small = dict(page_size=16, num_blocks=16, max_batch_tokens=64, max_requests_per_batch=6)  # seconds on CPU, not minutes
    batching = trainer(model, tok, tmp_path, top_k=1, use_transformers_continuous_batching=True,
                       transformers_continuous_batching_config=small)
    ours = prepack.trl.rollout_func()(repeated(PROMPTS[:2]), default)
    assert batching._generate(repeated(PROMPTS[:2]))[1] == ours["completion_ids"]


def test_rollout_refuses_what_it_cannot_honour(tiny, tmp_path):
    model, tok = tiny
    rollout = prepack.trl.rollout_func()
    with pytest.raises(ValueError, match="num_beams"):
        rollout(repeated(PROMPTS), trainer(model, tok, tmp_path, generation_kwargs={"num_beams": 2}))
    with pytest.raises(ValueError, match="bf16=True with a torch.float32 policy"):
        rollout(repeated(PROMPTS), trainer(model, tok, tmp_path, bf16=True))
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="prompt 0 carries non-text content"):
        rollout([image], trainer(model, tok, tmp_path, data=CHATS))
    with pytest.raises(ValueError, match="seed must be an integer"):
        prepack.trl.rollout_func(seed=1.5)
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        prepack.trl.rollout_func(max_batch=0)
    tr = trainer(model, tok, tmp_path)
    tr.tools = [reward]
    with pytest.raises(ValueError, match="tools"):
        rollout(repeated(PROMPTS), tr)


def test_packed_logprobs_equal_trls_padded_function(tiny, tmp_path):
    model, tok = tiny
    model.eval()
    tr = trainer(model, tok, tmp_path, temperature=0.8)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 1, 9, 0)]
    theirs, t_ent, mask = trl_logprobs(tr, model, prompts, completions)
    lps, ents = prepack.logprobs(model, prompts, completions, temperature=0.8, entropies=True)
    assert [len(x) for x in lps] == [5, 1, 9, 0] and all(x.dtype == torch.float32 for x in lps)
    ours = torch.nn.utils.rnn.pad_sequence(lps, batch_first=True)
    assert (ours - theirs)[mask].abs().max() <= 1e-5
    assert (torch.nn.utils.rnn.pad_sequence(ents, batch_first=True) - t_ent)[mask].abs().max() <= 1e-5
    assert torch.equal(prepack.logprobs(model, prompts, completions, temperature=0.8)[0], lps[0])


def test_packed_logprobs_refuse_bad_pairs(tiny):
    model, tok = tiny
    model.eval()
    with pytest.raises(ValueError, match="request 1 has an empty prompt"):
        prepack.logprobs(model, [[3], []], [[4], [5]])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        prepack.logprobs(model, [[3], [4]], [[4]])
    with pytest.raises(ValueError, match="request 0's completion has token id 9999"):
        prepack.logprobs(model, [[3]], [[9999]])
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        prepack.logprobs(model, [[3]], [[4]], temperature=0)
