"""A padding-free training batch builds its layout once per forward, not once per layer.

transformers hands every attention layer the same ``position_ids`` / ``cu_seq_lens_q`` tensor object;
prepack's first layer derives the layout (and chooses the kernel) from it and the others read it.
Oracle: each sequence run alone through the plain model.
"""

import torch
from transformers import DataCollatorWithFlattening

import prepack
from prepack.hf import registration as hf

from .models import build, prompts


def flattened(seqs, **kwargs) -> dict:
    """transformers' own padding-free batch of ``seqs`` (one row, restarting position ids)."""
    return DataCollatorWithFlattening(**kwargs)([{"input_ids": s.tolist()} for s in seqs])


def alone_logits(model, seqs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(s[None]).logits[0] for s in seqs])


def count_builds(monkeypatch) -> list:
    builds = []
    original = hf._TrainingBatch

    def counted(*args, **kwargs):
        builds.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "_TrainingBatch", counted)
    return builds


def count_choices(monkeypatch) -> list:
    choices = []
    original = hf.choose

    def counted(*args, **kwargs):
        choices.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "choose", counted)
    return choices


def test_position_ids_batch_derives_its_layout_and_kernel_once_per_forward(monkeypatch):
    model = prepack.enable(build("qwen2"))
    seqs = prompts([5, 9, 3])
    want = alone_logits(model, seqs)
    builds, choices = count_builds(monkeypatch), count_choices(monkeypatch)
    batch = flattened(seqs)
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert model.config.num_hidden_layers > 1
    assert len(builds) == 1 and len(choices) == 1
    assert (got - want).abs().max() <= 1e-4


def test_cu_seq_lens_batch_on_chunked_layers_splits_its_chunks_once_per_forward(monkeypatch):
    model = prepack.enable(build("llama4_text"))
    seqs = prompts([11, 4, 9])
    want = alone_logits(model, seqs)
    batch = flattened(seqs, return_flash_attn_kwargs=True)
    diffs = []
    original = torch.diff

    def counted(*args, **kwargs):
        diffs.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "diff", counted)
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    assert len(diffs) == 1
    assert (got - want).abs().max() <= 1e-4


def test_position_ids_changed_in_place_between_forwards_get_their_new_layout():
    model = prepack.enable(build("llama"))
    first, second = prompts([6, 6]), prompts([4, 8], seed=1)
    position_ids = flattened(first)["position_ids"]
    with torch.no_grad():
        model(input_ids=flattened(first)["input_ids"], position_ids=position_ids)
        position_ids.copy_(flattened(second)["position_ids"])  # the same tensor object, other sequences
        got = model(input_ids=flattened(second)["input_ids"], position_ids=position_ids).logits[0]
    assert (got - alone_logits(model, second)).abs().max() <= 1e-4


def test_a_new_batch_of_the_same_shape_gets_its_own_layout():
    model = prepack.enable(build("llama"))
    with torch.no_grad():
        for seqs in (prompts([6, 6]), prompts([4, 8], seed=1), prompts([12])):
            batch = flattened(seqs)
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            assert (got - alone_logits(model, seqs)).abs().max() <= 1e-4
