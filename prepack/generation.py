"""Step 6 of the data flow: decoding continues from the packed prefill.

``generate`` prefills every prompt but its last token, packed, scatters the
keys and values into a left-padded ``DynamicCache`` and hands that to
``model.generate``. The last prompt token stays out of the cache on purpose:
``generate`` must feed at least one uncached token to produce the first new
token's logits, and feeding exactly the last prompt token makes that step
identical to the last position of an ordinary padded prefill.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hf import cache_kwarg, model_device
from .prefill import check_prompts, prefill_tokens


def generate(
    model,
    sequences: Sequence,
    *,
    backend: str = "auto",
    capacity: int | None = None,
    token_budget: int | None = None,
    **generate_kwargs,
) -> list[torch.Tensor]:
    """Generate from many prompts with a packed prefill; decoding is ``model.generate``'s own.

    Args:
        model: a decoder-only transformers model (see :func:`prepack.prefill`).
        sequences: N prompts, lists of token ids or 1-D integer tensors.
        backend, capacity, token_budget: as in :func:`prepack.prefill`.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``,
            ``do_sample``, ``generation_config``, ...).

    Returns:
        N 1-D int64 tensors: the new tokens of each request, ending at its EOS
        token if it produced one. Greedy output is token-for-token what
        ``model.generate`` gives for the same prompts left-padded.
    """
    for key in ("input_ids", "attention_mask", "cache", "past_key_values", "inputs_embeds"):
        if key in generate_kwargs:
            raise ValueError(f"prepack.generate builds {key!r} itself from the prompts; do not pass it")
    tokens = check_prompts(model, sequences)
    if not tokens:
        return []
    device = model_device(model)
    longest = max(len(t) for t in tokens)
    gen_config = generate_kwargs.get("generation_config") or model.generation_config
    pad_id = generate_kwargs.get("pad_token_id", gen_config.pad_token_id)
    eos = generate_kwargs.get("eos_token_id", gen_config.eos_token_id)
    if pad_id is None:
        pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    generate_kwargs.setdefault("pad_token_id", pad_id)

    input_ids, attention_mask = left_pad(tokens, pad_id, device)
    if longest > 1:
        prefixes = [t[:-1] for t in tokens]
        result = prefill_tokens(model, prefixes, backend=backend, token_budget=token_budget, capacity=capacity, logits=False)
        cache, _ = result.left_padded_cache(pad_to=longest - 1)
        generate_kwargs[cache_kwarg(model)] = cache
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    return _strip(out[:, longest:], eos, pad_id)


def left_pad(prompts: Sequence, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(input_ids, attention_mask)``, both (N, L_max) int64, left-padded as decoding wants."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _strip(new: torch.Tensor, eos, pad_id) -> list[torch.Tensor]:
    """Cut each row after its first EOS (``generate`` pads finished rows with ``pad_id``)."""
    eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=new.device)
    rows = []
    for row in new:
        hit = torch.isin(row, eos_ids).nonzero()
        rows.append(row[: int(hit[0]) + 1] if len(hit) else row)
    return rows
