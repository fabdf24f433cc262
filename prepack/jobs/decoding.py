"""Per-request decoding rules, built by transformers itself for each prompt as if it were alone.

``model.generate`` turns its keywords and ``GenerationConfig`` into a ``LogitsProcessorList``
(repetition penalty, no-repeat n-grams, bad words, min length, temperature, top-k/p, ...) and a
``StoppingCriteriaList`` (max length, EOS, stop strings, max time, the caller's own), with the
lengths counted from the prompt. :class:`Rules` runs the same GenerationMixin steps once per
request, with that request's prompt, so every length limit is the request's own, never a padded
batch's. What the engine cannot honour (beam search, assisted decoding, streamers, score outputs)
is refused, never dropped.

Two pieces of the lists are read rather than called, because they are per-row arithmetic the engine
does for all rows at once: ``MaxLengthCriteria`` (a request stops when its prompt plus new tokens
reach ``max_length``) and ``EosTokenCriteria`` (stops on any of its EOS ids). Everything else is
called exactly as ``generate`` calls it, on the request's own (1, L) ids.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# keywords of model.generate that prepack's engine cannot honour: refused, never dropped
REFUSED = {
    "num_beams": "beam search is not implemented by prepack's engine; use model.generate for it",
    "num_beam_groups": "beam search is not implemented by prepack's engine; use model.generate for it",
    "assistant_model": "assisted decoding is not implemented by prepack's engine; use model.generate for it",
    "streamer": "prepack's engine yields whole requests (generate_iter); a token streamer is not supported",
    "return_dict_in_generate": "prepack returns one result per request; pass return_logprobs=True for tokens, log-probabilities and finish reasons",
    "output_scores": "pass return_logprobs=True for each chosen token's log-probability",
    "output_logits": "pass return_logprobs=True for each chosen token's log-probability",
    "output_attentions": "prepack's engine does not return attentions",
    "output_hidden_states": "prepack's engine does not return hidden states",
    "negative_prompt_ids": "classifier-free guidance is not implemented by prepack's engine",
    "guidance_scale": "classifier-free guidance is not implemented by prepack's engine",
    "synced_gpus": "prepack's engine runs on one device",
    "custom_generate": "prepack's engine runs its own decoding loop; call model.generate for a custom one",
}
# prepack.generate's own keywords (beside model.generate's), offered when a caller misspells one
CALL_OPTIONS = (
    "backend", "token_budget", "kv_budget", "max_batch", "tokenizer", "decode", "return_logprobs", "seed",
    "progress", "processor", "share_prefixes",
)
# other libraries' names for generate's options (vLLM's SamplingParams, OpenAI's API)
_ALIASES = {
    "max_tokens": "max_new_tokens", "n": "num_return_sequences", "logprobs": "return_logprobs",
    "stop": "stop_strings", "best_of": "num_return_sequences", "min_tokens": "min_new_tokens",
}
# the transformers loggers that build one request's rules (their warnings concern the call's configuration,
# the same for every request: the first request's are shown, the others' dropped)
_RULE_LOGGERS = (
    "transformers.generation.utils", "transformers.generation.configuration_utils",
    "transformers.generation.logits_process", "transformers.generation.stopping_criteria",
)
# our own keywords handed to GenerationMixin's builders, not to the GenerationConfig
_BUILDER_KWARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn")


def integer(value, name: str) -> int:
    """``value`` as an int when it is one: a Python, numpy or 0-d tensor/array integer (not a bool), as
    ``model.generate`` takes; else a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not (value.dtype.is_floating_point or value.dtype.is_complex):
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def positive_integer(value, name: str) -> int:
    """:func:`integer`, refused below 1."""
    try:
        n = integer(value, name)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


@dataclass
class RequestRules:
    """How one request decodes and stops, as ``model.generate`` would for its prompt alone.

    Attributes:
        max_length: prompt + new tokens at which it stops (``finish_reason="length"``).
        eos: its EOS ids (a stop with ``finish_reason="eos"``).
        processors: the ``LogitsProcessorList`` generate builds for it (empty: raw logits).
        criteria: the stopping criteria other than max length and EOS (stop strings, max time, custom).
        do_sample: multinomial sampling (else greedy argmax).
        temperature: what the chosen token's log-probability divides the logits by.
        clocks: the ``MaxTimeCriteria`` that ``max_time`` built, whose clock the engine starts when it
            admits the request (alone, its ``model.generate`` call would start then).
        history: the request's ids so far (:class:`IdsBuffer`), made by the engine the first time its
            processors or criteria read them.
    """

    max_length: int
    eos: frozenset
    processors: object
    criteria: object
    do_sample: bool
    temperature: float
    clocks: tuple = ()
    history: "IdsBuffer | None" = None


class IdsBuffer:
    """A request's prompt and new tokens so far, (1, L) int64, grown in place as it decodes: the ids its processors
    and stopping criteria read each step, without rebuilding them.

    :meth:`view` returns a view of the first L ids; ids before L never change afterwards, so a view a processor or
    criterion keeps stays what it saw (as ``model.generate``'s earlier ``input_ids`` do).
    """

    def __init__(self, prompt: np.ndarray, max_length: int, device):
        self.prompt_length = self.length = len(prompt)
        self.buffer = torch.empty(1, max(max_length, self.length + 1), dtype=torch.long, device=device)
        self.buffer[0, : self.length] = torch.from_numpy(np.asarray(prompt, np.int64))

    def view(self, tokens: list[int]) -> torch.Tensor:
        """(1, prompt + len(tokens)) the prompt then ``tokens`` (the request's new tokens, of which the buffer holds a prefix)."""
        n = self.prompt_length + len(tokens)
        if n > self.buffer.shape[1]:  # past max_length (never, as the engine stops there): grow
            self.buffer = torch.cat([self.buffer, self.buffer.new_empty(1, n)], 1)
        if n > self.length:
            self.buffer[0, self.length : n] = torch.tensor(tokens[self.length - self.prompt_length :], dtype=torch.long)
            self.length = n
        return self.buffer[:, :n]


class Rules:
    """The call's generation keywords, checked once; :meth:`for_request` builds one request's rules.

    Args:
        model: a transformers ``GenerationMixin`` model.
        kwargs: ``model.generate``'s keywords (``max_new_tokens``, ``do_sample``, ``generation_config``,
            ``logits_processor``, ``stopping_criteria``, ...). ``num_return_sequences`` is read by
            :attr:`samples`.
        tokenizer: handed to the stopping criteria (stop strings need it).
    """

    def __init__(self, model, kwargs: dict, tokenizer=None):
        kwargs = dict(kwargs)
        generation_config = kwargs.pop("generation_config", None)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        self.builders = {k: kwargs.pop(k, None) for k in _BUILDER_KWARGS}
        # generate's own defaults for the lists the caller did not pass
        self.builders["logits_processor"] = self.builders["logits_processor"] or LogitsProcessorList()
        self.builders["stopping_criteria"] = self.builders["stopping_criteria"] or StoppingCriteriaList()
        for key, why in REFUSED.items():
            value = kwargs.get(key, getattr(generation_config, key, None))
            if value is not None and value is not False and not (key in ("num_beams", "num_beam_groups") and value == 1) and not (
                key == "guidance_scale" and value == 1
            ):
                raise ValueError(f"prepack.generate does not support {key}={value!r}: {why}")
        self.model, self.tokenizer = model, tokenizer
        self.default_max = kwargs.get("max_length") is None and (
            generation_config is None or generation_config.max_length is None
        ) and model.generation_config.max_length is None
        self.default_min = kwargs.get("min_length") is None and (
            generation_config is None or generation_config.min_length is None
        ) and model.generation_config.min_length is None
        self.max_new = None  # per-prompt max_new_tokens, when a sequence is given
        given = kwargs.get("max_new_tokens")
        if isinstance(given, (list, tuple)) or isinstance(given, (np.ndarray, torch.Tensor)) and given.ndim > 0:
            if not len(given):
                raise ValueError("max_new_tokens must hold one integer >= 1 per prompt, got an empty sequence")
            self.max_new = [positive_integer(n, f"max_new_tokens[{i}]") for i, n in enumerate(given)]
            kwargs["max_new_tokens"] = max(self.max_new)  # checked by transformers; each prompt's is set per request
        elif given is not None:  # an integer, 0-d arrays and tensors included; 5.7 or True refused, never rounded
            kwargs["max_new_tokens"] = positive_integer(given, "max_new_tokens")
        for key in ("max_length", "min_length", "min_new_tokens"):  # lengths, as integers (min_* may be 0)
            if kwargs.get(key) is not None:
                kwargs[key] = positive_integer(kwargs[key], key) if key == "max_length" else integer(kwargs[key], key)
        config, unused = model._prepare_generation_config(generation_config, **kwargs)
        if unused:
            raise ValueError(unknown_keywords(sorted(unused), valid=[*config.to_dict(), *_BUILDER_KWARGS, *CALL_OPTIONS]))
        mode = str(getattr(config.get_generation_mode(), "value", config.get_generation_mode()))
        if mode not in ("greedy_search", "sample"):
            raise ValueError(f"prepack.generate decodes greedily or by sampling; this configuration asks for {mode!r}")
        samples = kwargs.get("num_return_sequences", config.num_return_sequences)
        samples = 1 if samples is None else samples
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {samples!r}")
        self.samples = int(samples)
        config.num_return_sequences = 1  # each sample is a request of its own
        self.config = config

    def max_length_of(self, n: int, index: int) -> int:
        """Prompt + new tokens at which prompt ``index`` (``n`` tokens) stops at the latest, for checks before it runs."""
        new = self.max_new[index] if self.max_new is not None and index < len(self.max_new) else self.config.max_new_tokens
        if new is not None:
            return n + new
        if self.default_max:  # _prepare_generated_length's default: max_length new tokens, within the positions
            most = getattr(self.model.config, "max_position_embeddings", None)
            return self.config.max_length + n if most is None else min(self.config.max_length + n, most)
        return self.config.max_length

    def for_request(self, prompt: torch.Tensor, device, *, index: int = 0, request: int | None = None,
                    quiet: bool = False) -> RequestRules:
        """The rules of prompt ``index``, ``prompt`` ((L,) int64), built as ``generate`` builds them for it alone.

        The request gets its own deep copy of the caller's ``logits_processor`` and ``stopping_criteria``
        (they may keep state, as one ``model.generate`` call per prompt would let them), and
        ``prefix_allowed_tokens_fn`` receives ``request`` (default ``index``) as its batch id: the row
        ``model.generate`` gives that request in a batch of all the prompts (prompt-major, ``p * G + g``
        with ``num_return_sequences=G``), which for one prompt alone is the row it gets alone.
        """
        from transformers import LogitsProcessorList
        from transformers.generation.stopping_criteria import (
            EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria, StoppingCriteriaList,
        )

        model, n = self.model, int(prompt.shape[0])
        config = copy.deepcopy(self.config)
        if self.max_new is not None:
            if index >= len(self.max_new):
                raise ValueError(f"request {index} has no max_new_tokens: {len(self.max_new)} were given, one per prompt")
            config.max_new_tokens = self.max_new[index]
        with warnings.catch_warnings(), _quiet_transformers(quiet):
            if quiet:  # the call's first request already warned about the same configuration
                warnings.simplefilter("ignore")
            config = model._prepare_generated_length(config, self.default_max, self.default_min, "input_ids", n, None)
            model._validate_generated_length(config, n, self.default_max)
            # a batch of one, as generate sees this prompt alone: the pad id resolves to the first EOS when unset,
            # and transformers' advice to pass an attention mask (for padded batches; prepack pads nothing) stays out
            model._prepare_special_tokens(config, None, device=device, batch_size=1)
            ids = prompt[None].to(device)
            allowed = self.builders["prefix_allowed_tokens_fn"]
            if allowed is not None:  # each request decodes as one row: give the fn the request's own batch id
                batch_id = index if request is None else request
                allowed = functools.partial(_with_batch_id, allowed, batch_id)
            mine = _own_copies(self.builders["stopping_criteria"], "stopping_criteria", StoppingCriteriaList)
            processors = model._get_logits_processor(
                generation_config=config, input_ids_seq_length=n, encoder_input_ids=ids,
                prefix_allowed_tokens_fn=allowed, device=device, model_kwargs={},
                logits_processor=_own_copies(self.builders["logits_processor"], "logits_processor", LogitsProcessorList),
            )
            criteria = model._get_stopping_criteria(config, mine, self.tokenizer)
        max_length, eos, other = None, frozenset(), StoppingCriteriaList()
        for c in criteria:
            if type(c) is MaxLengthCriteria:
                max_length = c.max_length if max_length is None else min(max_length, c.max_length)
            elif type(c) is EosTokenCriteria:
                eos = eos | frozenset(int(t) for t in c.eos_token_id.reshape(-1).tolist())
            else:
                other.append(c)
        if max_length is None:
            raise ValueError("prepack.generate needs a length limit (max_new_tokens or max_length)")
        # max_time's clock (built by transformers here, not one of the caller's own criteria) starts at admission
        clocks = tuple(c for c in other if type(c) is MaxTimeCriteria and not any(c is m for m in mine))
        return RequestRules(
            max_length=int(max_length), eos=eos, processors=processors, criteria=other,
            do_sample=bool(config.do_sample), temperature=float(config.temperature or 1.0) if config.do_sample else 1.0,
            clocks=clocks,
        )


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Drop what transformers' generation loggers say inside the block when ``quiet`` (later requests of a call)."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in _RULE_LOGGERS]
    me = threading.get_ident()

    def drop(record: logging.LogRecord) -> bool:  # this thread's records only: another thread's still print
        return record.thread != me

    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def unknown_keywords(names: list[str], valid) -> str:
    """The refusal of keywords neither ``model.generate`` nor prepack takes, each with the nearest valid name."""
    parts = []
    for name in names:
        near = _ALIASES.get(name) or next(iter(difflib.get_close_matches(name, sorted(set(valid)), n=1, cutoff=0.75)), None)
        parts.append(f"{name} (did you mean {near}?)" if near else name)
    return (
        f"prepack.generate does not take {', '.join(parts)}: not a generation option of model.generate "
        "(GenerationConfig) nor an argument of prepack.generate"
    )


def _with_batch_id(fn, batch_id: int, _row: int, ids: torch.Tensor):
    return fn(batch_id, ids)


def _own_copies(objects, name: str, kind):
    """A deep copy of each of the caller's processors or criteria, for one request; one that cannot be copied is refused."""
    out = kind()
    for k, obj in enumerate(objects):
        try:
            out.append(copy.deepcopy(obj))
        except Exception as e:  # noqa: BLE001 - whatever deepcopy raises, the caller gets the object's name
            raise ValueError(
                f"{name}[{k}] ({type(obj).__name__}) cannot be copied ({type(e).__name__}: {e}); prepack gives every "
                "request its own copy, as its own model.generate call would have one: make it copyable with "
                "copy.deepcopy (e.g. a __deepcopy__ that shares what is read-only)"
            ) from e
    return out


def top_p_warp(scores: torch.Tensor, warper) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper`` applied to (n, V) scores, bit for bit, without its (n, V) index sort.

    The warper sorts each row ascending, takes the softmax of the sorted row and its cumulative sum, and removes
    the prefix whose sum is at most ``1 - top_p`` (all but the last ``min_tokens_to_keep``). Only that prefix's
    length and the values matter: the sorted values (numpy's sort, no indices) give the same softmax and
    cumulative sum, so the same length k, and the removed tokens are those at most the k-th smallest value.
    Where that value is tied across the cut, which of the tied tokens torch's sort put first decides: such a
    row (and any CPU-less, non-fp32 or NaN case) goes through the warper itself.

    Args:
        scores: (n, V) float scores (after the processors before it).
        warper: a ``TopPLogitsWarper`` (its ``top_p``, ``min_tokens_to_keep``, ``filter_value``).

    Returns:
        (n, V) scores with the removed tokens at ``filter_value``, equal to ``warper(ids, scores)``.
    """
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.ndim != 2 or bool(torch.isnan(scores).any()):
        return warper(scores.new_zeros(len(scores), 0, dtype=torch.long), scores)
    n, vocab = scores.shape
    values = torch.from_numpy(np.sort(scores.numpy(), axis=-1))  # (n, V): torch.sort's values, ascending
    cumulative = values.softmax(dim=-1).cumsum(dim=-1)
    cut = (cumulative <= (1 - warper.top_p)).sum(-1).clamp(max=vocab - warper.min_tokens_to_keep)  # (n,) removed
    last = values.gather(1, (cut - 1).clamp(min=0)[:, None])  # (n, 1) the largest removed value
    remove = (scores <= last) & (cut > 0)[:, None]
    out = scores.masked_fill(remove, warper.filter_value)
    tied = ((remove.sum(-1) != cut) & (cut > 0)).nonzero()[:, 0]
    if len(tied):  # the cut splits tied values: the warper's own sort order decides, row by row as alone
        out[tied] = warper(scores.new_zeros(len(tied), 0, dtype=torch.long), scores[tied])
    return out
