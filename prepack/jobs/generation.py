"""Step 7 of the data flow, its public face: generate from many prompts, each as if alone.

:func:`generate` checks the prompts, builds each request's decoding rules the way ``model.generate``
builds them for that prompt alone (:mod:`prepack.jobs.decoding`) and runs prepack's own decode loop
(:mod:`prepack.jobs.engine`): one packed forward per step over the running requests' new tokens and the
newly admitted prompts, each request's keys in a store that grows and frees per request
(:mod:`prepack.executor.kvstore`), finished requests replaced by waiting ones in the same step. Nothing goes
through ``model.generate``: one path, whatever ``use_cache`` says (the engine always caches keys
and values itself; the tokens are what ``model.generate`` gives with or without its cache).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Sequence

import torch

from .decoding import Rules
from .engine import EngineStats, decode as _decode
from ..hf.registration import switched_iter
from ..hf.inputs import check_prompts, is_prompt_batch
from .result import Generation
from ..hf.wrapped import check_can_generate, check_mode

_BUILT_HERE = ("input_ids", "attention_mask", "cache", "past_key_values", "inputs_embeds", "position_ids")
_SHOW_PROGRESS_OVER = 256  # prompts; a bar by default for calls longer than this


def generate(
    model,
    sequences,
    *,
    backend: str = "auto",
    token_budget: int | None = None,
    kv_budget: int | None = None,
    max_batch: int | None = None,
    tokenizer=None,
    decode: bool = False,
    return_logprobs: bool = False,
    seed: int | None = None,
    progress: bool | None = None,
    processor=None,
    share_prefixes: bool = True,
    **generate_kwargs,
) -> list:
    """Generate from many prompts; each request gets what ``model.generate`` gives its prompt alone.

    Args:
        model: a decoder-only transformers model (see :func:`prepack.prefill`).
        sequences: N prompts, in any form :func:`prepack.prefill` takes (token ids, tokenizer
            output, strings or chats with ``tokenizer``).
        backend: the attention backend (a varlen one: ``"auto"``, ``"sdpa_varlen"``, ``"flash"``, ...).
        token_budget: most tokens one forward runs (decoding rows plus prompt chunks); a longer prompt
            is prefilled in chunks over several steps beside the running decodes (refused only for a
            model whose rotary frequencies depend on the length).
        kv_budget: most cached keys reserved at once (each running request reserves its prompt plus
            its most new tokens); memory follows the keys actually cached.
        max_batch: most requests decoding at once (None: as the budgets allow). Budgets, ``max_batch``,
            ``seed`` and lengths are integers (Python, numpy or 0-d tensors); anything else is refused.
        tokenizer: tokenizes string or chat prompts; fills each result's ``.text``; stop strings use it.
        decode: deprecated (returns bare strings; read ``.text`` instead), removed in the next release.
        return_logprobs: fill each result's ``.logprobs`` (``log_softmax(logits / temperature)`` of each
            chosen token).
        seed: request i samples from its own generator seeded ``seed + i`` (None: drawn from torch's
            global RNG, so ``torch.manual_seed`` makes a call reproducible). A request's samples do not
            depend on its neighbours, the budgets or the batch size.
        progress: a tqdm bar counting finished requests and generated tokens (default: over 256 prompts).
        processor: a vision-language model's processor, for chats with images (see :mod:`prepack.hf.vision`).
        share_prefixes: compute and hold once a prompt prefix that requests share (a system prompt, the
            prompt of ``num_return_sequences`` samples), read by each of them and freed with the last
            (see docs/generation.md); False computes every request's prompt on its own. Either way the
            tokens are what ``model.generate`` gives each prompt alone. Models with sliding windows,
            soft-capping, sinks or length-dependent RoPE never share (it would not be exact).
        **generate_kwargs: ``model.generate``'s generation options, per request: ``max_new_tokens``,
            ``min_new_tokens``, ``max_length``, ``min_length``, ``eos_token_id``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``stop_strings``,
            ``num_return_sequences``, ``generation_config``, ``logits_processor``, ``stopping_criteria``,
            ``use_cache`` (any value: the tokens are the same) .... Beam search, assisted decoding,
            streamers and score outputs are refused. Each request gets its own deep copy of
            ``logits_processor`` and ``stopping_criteria`` (their state is its own, as in its own
            ``model.generate`` call); ``prefix_allowed_tokens_fn`` gets the request's index as its batch id
            (``p * G + g``); ``max_time`` counts from the request's admission, not from the call.

    A model in train mode with active dropout is refused, as by every entry point (also when set between
    steps of a paused :func:`generate_iter`). When ``sequences`` is a list, every request's limits
    (``kv_budget``, a learned position table such as GPT-2's) are checked before any request runs.

    Returns:
        N * G :class:`~prepack.Generation` results (G = ``num_return_sequences``), prompt-major (prompt
        ``i``'s sample ``g`` at ``i * G + g``): ``.tokens`` ((n,) int64, the new tokens, ending at the EOS
        token when one was produced), ``.text`` (with ``tokenizer``), ``.logprobs`` (with
        ``return_logprobs``), ``.finish_reason``, ``.prompt`` and ``.sample``.
    """
    _warn_decode(decode, tokenizer)
    return generate_with_backends(
        model, sequences, backend=backend, token_budget=token_budget, kv_budget=kv_budget, max_batch=max_batch,
        tokenizer=tokenizer, decode=decode, return_logprobs=return_logprobs, seed=seed, progress=progress,
        processor=processor, share_prefixes=share_prefixes, **generate_kwargs,
    ).results


class Generated(NamedTuple):
    """What :func:`generate_with_backends` gives back.

    Attributes:
        results: what :func:`generate` returns.
        backends: the attention backend the engine ran (``"auto"`` resolved), once.
        stats: the run's :class:`~prepack.jobs.engine.EngineStats` (steps, peak KV bytes, first-token times).
    """

    results: list
    backends: tuple
    stats: EngineStats | None = None


def generate_with_backends(model, sequences, **kwargs) -> Generated:
    """:func:`generate` (same arguments), plus the attention backend that ran and the run's statistics."""
    if not is_prompt_batch(sequences):
        raise ValueError(
            f"generate takes a list of prompts, got {type(sequences).__name__}; for an iterator or another iterable "
            "of prompts use prepack.generate_iter"
        )
    for key in ("order", "total"):
        if key in kwargs:
            raise ValueError(f"{key}= is an option of prepack.generate_iter; prepack.generate returns every result at once, in input order")
    stats = EngineStats()
    results = list(_run(model, sequences, stats=stats, order="input", **kwargs))
    return Generated(results, (stats.backend,), stats)


def generate_iter(
    model,
    prompts: Iterable,
    *,
    order: str = "input",
    total: int | None = None,
    **kwargs,
) -> Iterator:
    """:func:`generate` over an iterable of any length, yielding each request's result as soon as it can.

    ``prompts`` is either what :func:`generate` takes (checked whole and accepted or refused exactly as
    :func:`generate` does) or any other iterable, read lazily as requests finish, so a prompt set larger
    than memory streams through (e.g. ``generate_iter(model, (row["text"] for row in dataset), tokenizer=tok)``);
    each element is one prompt. ``order="input"`` yields in request order, ``"completion"`` as requests
    finish (each :class:`~prepack.Generation` says its ``.prompt`` and ``.sample``). ``total`` sizes the progress
    bar (default: the number of prompts, when known). Other arguments as in :func:`generate`.
    """
    _warn_decode(kwargs.get("decode", False), kwargs.get("tokenizer"))
    yield from _run(model, prompts, order=order, total=total, **kwargs)


def _warn_decode(decode: bool, tokenizer) -> None:
    if decode and tokenizer is not None:  # without a tokenizer, decode=True is refused (in _run)
        warnings.warn(
            "prepack.generate(decode=True) is deprecated and will be removed in the next release: without it, each "
            "result is a prepack.Generation whose .text is the decoded string (pass tokenizer=)",
            DeprecationWarning, stacklevel=3,
        )


def _run(
    model, prompts, *, backend: str = "auto", token_budget=None, kv_budget=None, max_batch=None, tokenizer=None,
    decode: bool = False, return_logprobs: bool = False, seed=None, progress=None, total=None, order="input",
    stats=None, processor=None, share_prefixes: bool = True, **generate_kwargs,
) -> Iterator:
    for name, value in (("decode", decode), ("return_logprobs", return_logprobs), ("share_prefixes", share_prefixes)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None, got {progress!r}")
    if decode and tokenizer is None:
        raise ValueError("decode=True needs tokenizer= to turn the new tokens into text")
    check_can_generate(model)
    check_mode(model)  # as prefill and score: refused in train mode with active dropout (and at any step it is set)
    if decode and return_logprobs:
        raise ValueError("pass return_logprobs=True without decode=True: each Generation carries .text and .logprobs together")
    for key in _BUILT_HERE:
        if key in generate_kwargs:
            raise ValueError(f"prepack.generate builds {key!r} itself from the prompts; do not pass it")
    rules = Rules(model, generate_kwargs, tokenizer)
    if is_prompt_batch(prompts):  # in memory already: checked whole, so errors number requests from the first
        checked = check_prompts(model, prompts, tokenizer=tokenizer, processor=processor)
        tokens, vision = checked.tokens, checked.vision
        total = len(tokens) if total is None else total
        if rules.max_new is not None and len(rules.max_new) != len(tokens):
            raise ValueError(f"max_new_tokens holds {len(rules.max_new)} values but there are {len(tokens)} prompts; give one per prompt")
    else:
        if processor is not None:
            raise ValueError("processor= takes a list of chats; pass a list, not a lazy iterable, for prompts with images")
        tokens, vision = _check_stream(model, prompts, tokenizer), None
    bar = None
    if progress or progress is None and (total or 0) > _SHOW_PROGRESS_OVER:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if total is None else total * rules.samples, desc="prepack.generate", unit="req")
    run = _decode(
        model, tokens, rules, backend=backend, token_budget=token_budget, kv_budget=kv_budget, max_batch=max_batch,
        seed=seed, logprobs=return_logprobs, order=order, stats=stats, progress=bar, vision=vision,
        share_prefixes=share_prefixes,
    )
    steps = switched_iter(model, run)  # the model is switched while the run runs, and only then
    try:
        for done in steps:
            text = None if tokenizer is None else tokenizer.decode(done.tokens, skip_special_tokens=True)
            if decode:
                yield text
            else:
                prompt, sample = divmod(done.index, rules.samples)
                yield Generation(done.index, prompt, sample, done.tokens, text, done.logprobs, done.finish_reason)
    finally:
        steps.close()  # a caller that stops early lets go of the switch now, not when the generator is collected
        if bar is not None:
            bar.close()


def _check_stream(model, prompts: Iterable, tokenizer) -> Iterator:
    """Check a stream's prompts one by one, as they are read; an error names the request by its stream position."""
    for i, p in enumerate(prompts):
        try:
            checked = check_prompts(model, [p], tokenizer=tokenizer)
            if checked.vision is not None:
                raise ValueError("request 0 carries images; pass prompts with images as a list, not a lazy iterable")
            yield checked.tokens[0]
        except ValueError as e:
            raise ValueError(re.sub(r"\brequest 0\b", f"request {i}", str(e))) from e


def left_pad(prompts: Sequence, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(input_ids, attention_mask)``, both (N, L_max) int64, left-padded as decoding wants."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


