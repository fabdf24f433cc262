"""The oracle for every prepack result: each request run alone through the plain model.

prepack's promise is that a packed call gives each request what it would get alone. These
functions compute "alone" with nothing of prepack's in the path (the model's own forward and
``model.generate`` on one prompt at a time); the tests and ``benchmarks/model_zoo.py`` compare
against them, and so can a user checking a model prepack has not seen.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hf.registration import cache_kwarg


def alone(model, seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Each prompt run alone with a fresh cache.

    Args:
        seqs: N 1-D int64 token tensors on the model's device.

    Returns:
        ``(logits, caches)``: (N, V) float32 last-token logits, and each prompt's own cache
        (what ``model(seq, use_cache=True)`` returns; None for a model that returns none).
    """
    logits, caches = [], []
    with torch.no_grad():
        for s in seqs:
            out = model(s[None], use_cache=True)
            logits.append(out.logits[0, -1].float())
            caches.append(getattr(out, cache_kwarg(model), None) or getattr(out, "past_key_values", None))
    return torch.stack(logits) if logits else torch.zeros(0), caches


def alone_last_logits(model, seqs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, V): each prompt's last-token logits, run alone."""
    return alone(model, seqs)[0]


def alone_generate(model, seq: torch.Tensor, **generate_kwargs) -> list[int]:
    """``model.generate`` on this one prompt: its new tokens, up to and including the first EOS."""
    with torch.no_grad():
        out = model.generate(input_ids=seq[None], attention_mask=torch.ones_like(seq)[None], **generate_kwargs)
    config = generate_kwargs.get("generation_config") or model.generation_config
    eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    row = out[0, len(seq):].tolist()
    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return row[:cut]


def _layer_tensors(layer) -> dict:
    """A cache layer's tensors by name: keys and values, and a mixer layer's conv and recurrent states."""
    out = {"keys": getattr(layer, "keys", None), "values": getattr(layer, "values", None)}
    for name in ("conv_states", "recurrent_states"):
        states = getattr(layer, name, None)
        items = states.items() if isinstance(states, dict) else enumerate(states or ())
        out.update({f"{name}[{i}]": t for i, t in items if isinstance(t, torch.Tensor)})
    return out


def _linear(state) -> dict:
    return {"linear_cache": state if isinstance(state, torch.Tensor) else None}


def cache_gap(mine, theirs) -> float:
    """Max abs difference between two caches' keys and values (and mixer layers' conv and recurrent states), layer
    by layer (inf if laid out differently)."""
    if theirs is None or not hasattr(theirs, "layers"):
        return 0.0
    if len(mine.layers) != len(theirs.layers):
        return float("inf")
    gap = 0.0
    pairs = [(_layer_tensors(a), _layer_tensors(b)) for a, b in zip(mine.layers, theirs.layers, strict=True)]
    if hasattr(theirs, "linear_cache"):  # MiniMaxCache: each lightning-attention layer's state beside the layers
        if len(getattr(mine, "linear_cache", ())) != len(theirs.linear_cache):
            return float("inf")
        pairs += [(_linear(a), _linear(b)) for a, b in zip(mine.linear_cache, theirs.linear_cache)]
    for ta, tb in pairs:
        if set(ta) != set(tb):
            return float("inf")
        for name in ta:
            x, y = ta[name], tb[name]
            if x is None and y is None:
                continue
            if x is None or y is None or x.shape != y.shape:
                return float("inf")
            if x.numel():
                gap = max(gap, float((x - y).abs().max()))
    return gap
