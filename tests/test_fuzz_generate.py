"""Randomized trials: prepack.generate on random workloads equals model.generate on each prompt alone.

Each trial draws prompts (some sharing a prefix, at one or two levels, some repeated), per-request ``max_new_tokens``, greedy or
sampled decoding with random processors, an EOS id, ``num_return_sequences``, ``token_budget``, ``kv_budget``,
``max_batch`` and ``share_prefixes``, and compares every request's tokens with ``model.generate`` on its prompt
alone (a sampled request ``i`` alone under ``torch.manual_seed(seed + i)``, the generator prepack gives it).
A failure names its trial seed and workload; ``PREPACK_FUZZ_TRIALS=500 python -m pytest tests/test_fuzz_generate.py``
runs more trials than CI's few seconds allow.
"""

import os

import numpy as np
import pytest
import torch

import prepack

from .models import VOCAB, build

TRIALS = int(os.environ.get("PREPACK_FUZZ_TRIALS", 6))
MODELS = {arch: build(arch) for arch in ("llama", "qwen2", "mistral")}


def workload(seed: int) -> tuple[str, list, dict, dict]:
    """(architecture, prompts, prepack's scheduling options, the generation options), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    # a shared prefix short or long enough to be held once (prepack.executor.regions.MIN_SHARED_TOKENS), and a
    # second level under it that some of its prompts share too
    prefix = rng.integers(3, VOCAB, int(rng.choice([rng.integers(1, 13), rng.integers(32, 45)]))).tolist()
    middle = rng.integers(3, VOCAB, int(rng.integers(32, 40))).tolist()
    prompts = []
    for _ in range(n):
        if prompts and rng.random() < 0.15:  # the same prompt twice
            prompts.append(list(prompts[int(rng.integers(len(prompts)))]))
            continue
        own = rng.integers(3, VOCAB, int(rng.integers(1, 11))).tolist()
        shared = prefix + (middle if rng.random() < 0.4 else [])
        prompts.append(shared + own if rng.random() < 0.5 else own)
    new = [int(m) for m in rng.integers(1, 9, n)]
    gen = dict(max_new_tokens=new if rng.random() < 0.7 else max(new), pad_token_id=0,
               eos_token_id=int(rng.integers(3, VOCAB)) if rng.random() < 0.5 else None, num_return_sequences=1)
    if rng.random() < 0.5:  # several samples of a prompt only when sampling (generate refuses them greedy)
        gen.update(do_sample=True, temperature=float(rng.choice([0.7, 1.0, 1.5])), num_return_sequences=int(rng.integers(1, 3)))
        if rng.random() < 0.5:
            gen["top_k"] = int(rng.integers(2, 20))
        if rng.random() < 0.5:
            gen["top_p"] = float(rng.choice([0.5, 0.9]))
    else:
        gen["do_sample"] = False
    if rng.random() < 0.3:
        gen["repetition_penalty"] = 1.3
    longest = max(len(p) + (max(new) if isinstance(gen["max_new_tokens"], int) else m) for p, m in zip(prompts, new))
    run = dict(
        token_budget=[None, int(rng.integers(4, 40))][int(rng.integers(2))],
        kv_budget=[None, longest + int(rng.integers(0, 40))][int(rng.integers(2))],
        max_batch=[None, int(rng.integers(1, 5))][int(rng.integers(2))],
        share_prefixes=bool(rng.random() < 0.7), seed=seed,
    )
    arch = str(rng.choice(sorted(MODELS)))
    return arch, prompts, run, gen


def alone(model, prompts: list, seed: int, gen: dict) -> list[list[int]]:
    """model.generate on each request's prompt alone: prompt-major, G samples each, sample i seeded ``seed + i``."""
    samples, per_prompt = gen["num_return_sequences"], gen["max_new_tokens"]
    out = []
    for p, prompt in enumerate(prompts):
        kwargs = {**gen, "num_return_sequences": 1}
        if isinstance(per_prompt, list):
            kwargs["max_new_tokens"] = per_prompt[p]
        ids = torch.tensor([prompt])
        for g in range(samples):
            torch.manual_seed(seed + p * samples + g)
            with torch.no_grad():
                row = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, len(prompt):].tolist()
            eos = kwargs["eos_token_id"]
            if eos is not None and eos in row:  # generate pads after EOS; prepack's result ends at it
                row = row[: row.index(eos) + 1]
            out.append(row)
    return out


@pytest.mark.parametrize("seed", range(TRIALS))
def test_random_workloads_equal_generate_on_each_prompt_alone(seed):
    arch, prompts, run, gen = workload(seed)
    model = MODELS[arch]
    got = [t.tokens.tolist() for t in prepack.generate(model, [torch.tensor(p) for p in prompts], **run, **gen)]
    want = alone(model, prompts, seed, gen)
    assert got == want, f"trial seed {seed}: {arch}, prompts {prompts}, {run}, {gen}"
