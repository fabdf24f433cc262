"""Step 7 of the data flow: decoding continues from the packed prefill.

``generate`` prefills every prompt but its last token, packed, scatters the
keys and values into a left-padded ``DynamicCache`` and hands that to
``model.generate``. The last prompt token stays out of the cache on purpose:
``generate`` must feed at least one uncached token to produce the first new
token's logits, and feeding exactly the last prompt token makes that step
identical to the last position of an ordinary padded prefill.

Prompts run in waves of ``wave_size``: each wave is prefilled, decoded and
released before the next, so memory is bounded by a wave, not by the number of
prompts. Within a wave each distinct prompt is prefilled once, however many
times it appears and however many samples (``num_return_sequences``) are drawn
from it: the cache rows of its samples are gathered from the same packed keys
and values.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .hf import cache_kwarg, model_device
from .inputs import check_prompts, is_prompt_batch
from .prefill import prefill_tokens
from .rope import check_lengths, decode_key
from .wrapped import check_can_generate

DEFAULT_WAVE_SIZE = 256

# generate() options whose output prepack cannot return faithfully: refused, never dropped.
_REFUSED = {
    "num_beams": "beam search reorders cache rows between steps; use model.generate for it",
    "return_dict_in_generate": "prepack.generate returns the new tokens of each request; use model.generate for scores",
    "output_scores": "prepack.generate returns the new tokens of each request; use model.generate for scores",
    "output_logits": "prepack.generate returns the new tokens of each request; use model.generate for logits",
    "streamer": "a streamer would see the waves' rows, not the requests, in order",
}
_BUILT_HERE = ("input_ids", "attention_mask", "cache", "past_key_values", "inputs_embeds")


def generate(
    model,
    sequences,
    *,
    backend: str = "auto",
    capacity: int | None = None,
    token_budget: int | None = None,
    tokenizer=None,
    decode: bool = False,
    wave_size: int = DEFAULT_WAVE_SIZE,
    progress: bool | None = None,
    **generate_kwargs,
) -> list:
    """Generate from many prompts with a packed prefill; decoding is ``model.generate``'s own.

    Args:
        model: a decoder-only transformers model (see :func:`prepack.prefill`).
        sequences: N prompts, in any form :func:`prepack.prefill` takes (token ids,
            tokenizer output, strings or chats with ``tokenizer``).
        backend, capacity, token_budget: as in :func:`prepack.prefill`.
        tokenizer: tokenizes string or chat prompts, and decodes with ``decode``.
        decode: return strings (``tokenizer.decode`` of the new tokens, special tokens skipped).
        wave_size: prompts prefilled and decoded together; memory is bounded by one wave.
        progress: a tqdm bar over prompts (default: when there is more than one wave).
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``,
            ``num_return_sequences``, ``generation_config``, ...). ``num_beams > 1``,
            ``return_dict_in_generate``, ``output_scores``, ``output_logits`` and ``streamer`` are refused.

    Returns:
        N * G results (G = ``num_return_sequences``, default 1), request-major as
        ``model.generate`` orders them: 1-D int64 tensors of new tokens, each ending at its EOS
        token if it produced one, or strings with ``decode``. Greedy output is token-for-token
        what ``model.generate`` gives for the same prompts left-padded.
    """
    return generate_with_backends(
        model, sequences, backend=backend, capacity=capacity, token_budget=token_budget, tokenizer=tokenizer,
        decode=decode, wave_size=wave_size, progress=progress, **generate_kwargs,
    ).results


class Generated(NamedTuple):
    """What :func:`generate_with_backends` gives back.

    Attributes:
        results: what :func:`generate` returns.
        backends: one per wave, the attention backend its packed prefill ran
            (``PrefillResult.backend``), or None for a wave of one-token prompts, which has no prefill.
    """

    results: list
    backends: tuple


def generate_with_backends(model, sequences, **kwargs) -> Generated:
    """:func:`generate` (same arguments), plus the attention backend each wave's packed prefill ran.

    The backend is the one the run reports, not a second resolution of ``backend``:
    a benchmark row that names it names the kernel that ran.
    """
    if not is_prompt_batch(sequences):
        raise ValueError(
            f"generate takes a list of prompts, got {type(sequences).__name__}; for an iterator or another iterable "
            "of prompts use prepack.generate_iter"
        )
    results, backends = [], []
    # _waves checks a batch of prompts whole, before anything runs
    for rows, ran in _waves(model, sequences, **kwargs):
        results += rows
        backends.append(ran)
    return Generated(results, tuple(backends))


def generate_iter(
    model,
    prompts: Iterable,
    *,
    backend: str = "auto",
    capacity: int | None = None,
    token_budget: int | None = None,
    tokenizer=None,
    decode: bool = False,
    wave_size: int = DEFAULT_WAVE_SIZE,
    progress: bool | None = None,
    total: int | None = None,
    **generate_kwargs,
) -> Iterator:
    """:func:`generate` over an iterable of any length: yields each request's results in input order.

    ``prompts`` is either what :func:`generate` takes (a list, a tensor, tokenizer output: checked
    whole and accepted or refused exactly as :func:`generate` does), or any other iterable, read
    ``wave_size`` prompts at a time, so a prompt set larger than memory streams through (e.g.
    ``generate_iter(model, (row["text"] for row in dataset), tokenizer=tok)``); each of its
    elements is one prompt (token ids, a string or a chat). Arguments as in :func:`generate`;
    ``total`` sizes the progress bar (default: the number of prompts, when known).
    """
    for rows, _ in _waves(
        model, prompts, backend=backend, capacity=capacity, token_budget=token_budget, tokenizer=tokenizer,
        decode=decode, wave_size=wave_size, progress=progress, total=total, **generate_kwargs,
    ):
        yield from rows


def _waves(
    model, prompts: Iterable, *, backend: str = "auto", capacity: int | None = None, token_budget: int | None = None,
    tokenizer=None, decode: bool = False, wave_size: int = DEFAULT_WAVE_SIZE, progress: bool | None = None,
    total: int | None = None, **generate_kwargs,
) -> Iterator[tuple[list, str | None]]:
    """Yield ``(results, backend)`` per wave: the wave's results in input order, and its prefill's backend."""
    if not isinstance(wave_size, int) or isinstance(wave_size, bool) or wave_size < 1:
        raise ValueError(f"wave_size must be an integer >= 1, got {wave_size!r}")
    if decode and tokenizer is None:
        raise ValueError("decode=True needs tokenizer= to turn the new tokens into text")
    check_can_generate(model)
    samples = _check_generate_kwargs(generate_kwargs)
    gen_config = generate_kwargs.get("generation_config") or model.generation_config
    eos = generate_kwargs.get("eos_token_id", gen_config.eos_token_id)
    pad_id = generate_kwargs.get("pad_token_id", gen_config.pad_token_id)
    if pad_id is None:
        pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    if generate_kwargs.get("generation_config") is None or "pad_token_id" in generate_kwargs:
        generate_kwargs["pad_token_id"] = pad_id
    elif gen_config.pad_token_id != pad_id:
        # a generation_config carries the pad id itself: passing it beside the config is deprecated
        generate_kwargs["generation_config"] = gen_config = _copy_config(gen_config)
        gen_config.pad_token_id = pad_id

    if is_prompt_batch(prompts):  # in memory already: checked whole, so errors number requests from the first
        checked = check_prompts(model, prompts, tokenizer=tokenizer).tokens
        it, total = iter(checked), len(checked) if total is None else total
    else:
        checked, it = None, iter(prompts)
    bar = None
    if progress or progress is None and (total or 0) > wave_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="prepack.generate", unit="prompt")
    try:
        start = 0
        while wave := list(itertools.islice(it, wave_size)):
            try:
                tokens = wave if checked is not None else check_prompts(model, wave, tokenizer=tokenizer).tokens
                rows, ran = _generate_wave(model, tokens, samples, pad_id, eos, backend, capacity, token_budget, generate_kwargs)
            except ValueError as e:  # an error that numbers requests counts them from the start of this wave
                if start and _names_a_request(e):
                    raise ValueError(f"{e} (request numbers count from {start}, the start of this wave)") from e
                raise
            yield [tokenizer.decode(row, skip_special_tokens=True) if decode else row for row in rows], ran
            start += len(wave)
            if bar is not None:
                bar.update(len(wave))
    finally:
        if bar is not None:
            bar.close()


def _names_a_request(error: Exception) -> bool:
    """Whether ``error`` names a request by number (a typo in a generate keyword, say, does not)."""
    return re.search(r"\brequests? \d", str(error)) is not None


def _check_generate_kwargs(kwargs: dict) -> int:
    """Refuse what prepack cannot honour; return G, the samples per prompt."""
    for key in _BUILT_HERE:
        if key in kwargs:
            raise ValueError(f"prepack.generate builds {key!r} itself from the prompts; do not pass it")
    config = kwargs.get("generation_config")
    for key, why in _REFUSED.items():
        value = kwargs.get(key, getattr(config, key, None))
        if value is not None and value is not False and not (key == "num_beams" and value == 1):
            raise ValueError(f"prepack.generate does not support {key}={value!r}: {why}")
    if kwargs.get("use_cache", True) is False:
        raise ValueError("prepack.generate decodes from the packed prefill's cache; it does not support use_cache=False")
    # a config with use_cache=False (a training checkpoint) would make model.generate drop the prefill's cache
    kwargs["use_cache"] = True
    samples = kwargs.pop("num_return_sequences", getattr(config, "num_return_sequences", None) or 1)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {samples!r}")
    if config is not None and getattr(config, "num_return_sequences", 1) != 1:
        kwargs["generation_config"] = config = _copy_config(config)
        config.num_return_sequences = 1  # the rows are expanded here, with shared prompt caches
    return int(samples)


def _copy_config(config):
    import copy

    return copy.deepcopy(config)


def _generate_wave(model, tokens, samples, pad_id, eos, backend, capacity, token_budget, generate_kwargs) -> tuple:
    """One wave: prefill each distinct prompt once, then decode every (prompt, sample) row together.

    With length-dependent RoPE (longrope, dynamic NTK: :mod:`prepack.rope`) a decode forward's
    frequencies follow its longest row, so rows decode together only where their prompts give the
    same frequencies at every step; each such group is one ``model.generate`` call.

    Returns:
        (new tokens per row, the backend the prefill ran or None when no prompt is long enough to need one).
    """
    if not tokens:
        return [], None
    _check_prefills_fit(tokens, token_budget, capacity)
    device = model_device(model)
    # identical prompts share one prefill: `rows` maps each output row to its distinct prompt
    distinct: dict[bytes, int] = {}
    which = np.array([distinct.setdefault(t.tobytes(), len(distinct)) for t in tokens], np.int64)
    unique = [None] * len(distinct)
    for t, d in zip(tokens, which):
        unique[d] = t
    rows = np.repeat(which, samples)
    lengths = np.array([len(t) for t in unique], np.int64)
    steps = _decode_steps(model, generate_kwargs)
    dep = check_lengths(model, lengths + steps - 1)  # the positions each prompt's own decoding reaches
    result = ran = None
    if lengths.max() > 1:
        if dep is None:
            result = prefill_tokens(
                model, [t[:-1] for t in unique], backend=backend, token_budget=token_budget, capacity=capacity, logits=False
            )
        else:
            # alone, a prompt's first forward covers all its tokens, and its frequencies follow that length:
            # prefill all of them and keep all but the last in the cache
            full = prefill_tokens(model, unique, backend=backend, token_budget=token_budget, capacity=capacity, logits=False)
            result = dataclasses.replace(full, lengths=full.lengths - 1)
        ran = result.backend
    keys = [decode_key(dep, int(lengths[d]), steps) for d in rows]
    out: list = [None] * len(rows)
    for key in dict.fromkeys(keys):
        sel = np.array([j for j, k in enumerate(keys) if k == key], np.int64)
        sub = rows[sel]
        longest = int(lengths[sub].max())
        input_ids, attention_mask = left_pad([unique[d] for d in sub], pad_id, device)
        kwargs = dict(generate_kwargs)
        if longest > 1:
            kwargs[cache_kwarg(model)] = _cache_rows(result, sub, longest - 1)
        new = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        for j, row in zip(sel.tolist(), _strip(new[:, longest:], eos), strict=True):
            out[j] = row
    return out, ran


def _cache_rows(result, rows: np.ndarray, pad_to: int):
    """``result.left_padded_cache`` of ``rows`` (prompt indices, repeats allowed) only, left-padded to ``pad_to``."""
    if len(rows) and pad_to >= int(result.lengths.max()):
        return result.left_padded_cache(pad_to=pad_to, rows=rows)[0]
    prompts, local = np.unique(rows, return_inverse=True)
    at = torch.from_numpy(prompts).to(result.lengths.device)
    sub = dataclasses.replace(result, lengths=result.lengths[at], chunk=result.chunk[prompts], starts=result.starts[prompts])
    return sub.left_padded_cache(pad_to=pad_to, rows=local)[0]


def _decode_steps(model, generate_kwargs: dict) -> int:
    """An upper bound on the decode forwards of one row: ``max_new_tokens``, else ``max_length``."""
    config = generate_kwargs.get("generation_config") or model.generation_config
    steps = generate_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if steps is None:
        steps = generate_kwargs.get("max_length", getattr(config, "max_length", None)) or 1
    return max(1, int(steps))


def _check_prefills_fit(tokens, token_budget, capacity) -> None:
    """Each prompt's prefill (all but its last token) fits the caller's limits. Checked here, so that an error
    numbers the wave's requests, not the distinct prompts that the prefill runs."""
    prefill = np.array([len(t) - 1 for t in tokens], np.int64)
    for name, limit in (("token_budget", token_budget), ("capacity", capacity)):
        if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool):
            continue  # None, or a value the prefill refuses itself
        over = np.flatnonzero(prefill > limit)
        if len(over):
            i = int(over[0])
            raise ValueError(
                f"request {i} has {len(tokens[i])} tokens, {prefill[i]} to prefill (all but the last), but {name} is "
                f"{limit} (raise {name})"
            )


def left_pad(prompts: Sequence, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(input_ids, attention_mask)``, both (N, L_max) int64, left-padded as decoding wants."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _strip(new: torch.Tensor, eos) -> list[torch.Tensor]:
    """Cut each row after its first EOS (``generate`` pads finished rows with the pad token)."""
    eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=new.device)
    rows = []
    for row in new:
        hit = torch.isin(row, eos_ids).nonzero()
        rows.append(row[: int(hit[0]) + 1] if len(hit) else row)
    return rows
