"""Step 7 of the data flow: prepack's own decode loop, one packed forward per step.

Each step is one forward of the model whose segments are the running requests' new tokens (one
each: query length 1, key length = cached + 1) plus prompts, or chunks of prompts, of requests being
prefilled (query length = the chunk, key length = cached + chunk). What a step feeds is planned by
:mod:`prepack.executor.scheduler`: decode rows first, then prompt chunks within ``token_budget``, then newly
admitted requests while the reserved keys (each admitted request's prompt plus its most new tokens)
fit ``kv_budget``. Every segment attends to its own request's keys only, read from the
:class:`~prepack.executor.kvstore.KVStore` (no padding, no per-step copy of the cache). A finished request
frees its keys at once and waiting prompts are admitted in the same step (continuous refill). Prompt
prefixes that requests share, at any depth, are computed once and held once
(:mod:`prepack.executor.regions`), their attention merged from parts (:mod:`prepack.attention.cascade`).

What a request decodes and when it stops is what ``model.generate`` does for that prompt alone:
transformers builds its logits processors and stopping criteria from its own prompt
(:mod:`prepack.jobs.decoding`). One step (:meth:`_Run.step`) is schedule, run, postprocess; the run, in short::

    feeds, units = scheduler.next_step(waiting)                     # tokens each request (or region) feeds
    kv = store.plan(feeds)                                          # room for the new keys; segment order
    ids, pos = concat(pending[u][:feeds[u]] for u in kv.order), ranges(offset + kv.cached, kv.q)  # (T,), (T,)
    call = PackedCall(kv.layout, kernel, kv=kv)                     # every layer appends and reads via kv
    logits = model(ids[None], position_ids=pos[None], prepack=call,
                   use_cache=False, logits_to_keep=last_of_each_sampling_segment).logits[0]   # (n, V)
    tokens = choose(logits, rules)                                  # per request: processors, argmax / sample
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..attention.registry import choose
from .decoding import IdsBuffer, Rules, integer, positive_integer
from .sampling import draw, row_wise_steps, warp_rows
from ..executor.step import forward_step, rope_groups
from ..hf.model import base_model, default_token_budget
from ..hf.registration import attention_needs, model_device, require_switched
from ..executor.kvstore import KVStore
from ..executor.regions import merge_refusal
from ..executor.scheduler import Request, Scheduler
from ..hf.rope import RopeDependence, rope_dependence
from ..hf.support import UnsupportedModelError, kv_share_sources, revisiting_attention
from ..mixers.states import HeldStates
from ..mixers.states import keyless_layers
from ..hf.wrapped import check_mode, runner, unwrap

FINISH_REASONS = ("eos", "length", "stop")
_ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")


class Completion(NamedTuple):
    """One request's result.

    Attributes:
        index: the request's number in the call (prompt-major: prompt i's sample g is ``i * G + g``).
        tokens: (n,) int64, the new tokens, ending at its EOS when it produced one.
        logprobs: (n,) float32, ``log_softmax(logits / temperature)`` of each chosen token (the raw
            logits, before any processor; ``temperature`` 1 for greedy), or None unless asked for.
        finish_reason: ``"eos"``, ``"length"`` (max_new_tokens / max_length) or ``"stop"`` (stop
            strings, max time or the caller's stopping criteria).
    """

    index: int
    tokens: torch.Tensor
    logprobs: torch.Tensor | None
    finish_reason: str


@dataclass
class EngineStats:
    """What a run measured, filled in as it runs (pass one to :func:`decode` to read it).

    Attributes:
        steps: forwards run. tokens: new tokens generated.
        peak_kv_bytes: the most bytes the KV pools held. peak_live_tokens: the most keys cached at once
            (a shared prefix region counted once).
        kv_bytes_per_token: bytes one cached token takes (all layers, keys and values).
        first_token_s: per request index, seconds from the call's start to its first new token.
        batch_sizes: per step, the requests that fed it tokens.
        decode_rows: per step, the requests that fed it their newest token (decoding).
        prompt_tokens: per step, the prompt tokens it fed (whole prompts, chunks, prefix regions).
        step_end_s: per step, seconds from the call's start to the step's end.
        prefix_regions: shared prefix regions computed. shared_prefix_tokens: prompt tokens not
            computed because a request read a region another request's admission had computed.
        backend: the attention kernel the run chose (``"auto"`` resolved).
    """

    steps: int = 0
    tokens: int = 0
    peak_kv_bytes: int = 0
    peak_live_tokens: int = 0
    kv_bytes_per_token: int = 0
    first_token_s: dict = field(default_factory=dict)
    batch_sizes: list = field(default_factory=list)
    decode_rows: list = field(default_factory=list)
    prompt_tokens: list = field(default_factory=list)
    step_end_s: list = field(default_factory=list)
    prefix_regions: int = 0
    shared_prefix_tokens: int = 0
    backend: str | None = None

    def worst_decode_gap_s(self) -> float:
        """The longest time between two steps in which some request decoded in both (0 with fewer steps)."""
        gaps = [self.step_end_s[i] - self.step_end_s[i - 1] for i in range(1, self.steps)
                if self.decode_rows[i] and self.batch_sizes[i - 1]]
        return max(gaps, default=0.0)


def decode(
    model,
    prompts: Iterable[np.ndarray],
    rules: Rules,
    *,
    backend: str = "auto",
    token_budget: int | None = None,
    kv_budget: int | None = None,
    max_batch: int | None = None,
    seed: int | None = None,
    logprobs: bool = False,
    order: str = "input",
    share_prefixes: bool = True,
    stats: EngineStats | None = None,
    progress=None,
    vision=None,
) -> Iterator[Completion]:
    """Decode checked prompts ((L,) int64 arrays, read lazily) with continuous refill; yield :class:`Completion`.

    Args:
        rules: the call's generation keywords (:class:`~prepack.jobs.decoding.Rules`); each prompt yields
            ``rules.samples`` requests.
        token_budget: most tokens one forward runs (decode rows plus prompt chunks); a longer prompt
            is prefilled in chunks over several steps, beside the running decodes.
        kv_budget: most keys reserved at once: each running request reserves its prompt plus its most
            new tokens (a shared prefix region once), so the store never needs more than this.
        max_batch: most requests running at once (None: as the budgets allow).
        seed: seeds sampling; request ``i`` draws from its own generator seeded ``seed + i``, so its
            samples do not depend on its neighbours (None: a seed drawn from torch's global RNG).
        order: ``"input"`` (request order) or ``"completion"`` (as they finish).
        share_prefixes: hold a prompt prefix that requests share once (:mod:`prepack.executor.regions`);
            ignored, exactly, for a model whose attention cannot merge a prefix part exactly.
        progress: a tqdm bar to update per finished request, or None.
        vision: the prompts' images and positions (:class:`prepack.hf.vision.VisionPrompts`), or None.
    """
    max_batch = None if max_batch is None else positive_integer(max_batch, "max_batch")
    seed = None if seed is None else integer(seed, "seed")
    if order not in ("input", "completion"):
        raise ValueError(f"order must be 'input' or 'completion', got {order!r}")
    if not isinstance(share_prefixes, bool):
        raise ValueError(f"share_prefixes must be True or False, got {share_prefixes!r}")
    run = _start(model, prompts, rules, backend=backend, token_budget=token_budget, kv_budget=kv_budget,
                 max_batch=max_batch, seed=seed, logprobs=logprobs, share_prefixes=share_prefixes, stats=stats,
                 progress=progress, vision=vision)
    done, next_out, training = {}, 0, model.training
    while True:
        if model.training != training:  # switched between steps (a paused generate_iter): the rule of every entry point
            training = model.training
            if training:
                check_mode(model)
        finished = run.step()
        if finished is None:
            break
        done.update((c.index, c) for c in finished)
        if order == "completion":
            yield from (done.pop(i) for i in sorted(done))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1
    yield from (done.pop(i) for i in sorted(done))  # input order: nothing is left unless a request was never ready


def _start(model, prompts, rules: Rules, *, backend, token_budget, kv_budget, max_batch, seed, logprobs: bool,
           share_prefixes: bool, stats, progress, vision) -> "_Run":
    """Choose the kernel, check the model and every request's limits, and lay out the run (see :func:`decode`)."""
    device = model_device(model)
    check_engine_model(model)
    kernel = choose(backend, device=device, dtype=next(model.parameters()).dtype,
                    needs=attention_needs(model, continues_keys=True))
    if kernel.rows:
        raise ValueError(f"backend {kernel.name!r} lays requests out in rows; the decode engine needs a varlen backend")
    token_budget = _budget(token_budget, "token_budget", default_token_budget(model))
    kv_budget = _budget(kv_budget, "kv_budget", default_kv_budget(model))
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    stats = EngineStats() if stats is None else stats
    stats.backend = kernel.name
    rope = rope_dependence(model)
    plain = merge_refusal(model, rope) is None  # attention that can be merged from parts exactly
    # a prompt with images runs whole in one step: its image features and mRoPE rows are laid out for the
    # whole prompt, so it neither continues a shared prefix nor is split into chunks
    share = share_prefixes and plain and vision is None
    chunk = rope is None and vision is None
    require_switched(model)  # held by the caller for the whole run (prepack.hf.registration.switched_iter)
    module = runner(model)  # not torch.compile's wrapper; PEFT adapters and hooks stay in the call
    keyless = keyless_layers(model)
    # on CPU a chunk that continues its own keys runs as two merged parts on the fused flash kernel
    store = KVStore(device, split_chunks=plain and device.type == "cpu", slides=cache_slides(model),
                    reads=kv_share_sources(unwrap(model).config), revisits=revisiting_attention(unwrap(model)),
                    keyless=keyless)
    if keyless:  # token mixers outside attention (prepack.mixers) keep each request's conv / recurrent state across steps
        store.states = HeldStates(unwrap(model).config.get_text_config(decoder=True), store.prefix_of)

    limits = _Limits(type(model).__name__, position_limit(model), kv_budget, token_budget, chunk, rope)
    if isinstance(prompts, Sequence):  # all in memory: every request's limits before any runs, so none is lost
        for p, prompt in enumerate(prompts):
            limits.check(p * rules.samples, len(prompt), rules.max_length_of(len(prompt), p))

    def admit_check(r: Request) -> None:
        limits.check(r.index, len(r.prompt), r.rules.max_length)
        if rope is not None:
            _check_rope(model, rope, r)
        for clock in r.rules.clocks:  # alone, its max_time would count from its own generate call: from now
            clock.initial_timestamp = time.time()

    sched = Scheduler(store, token_budget=token_budget, kv_budget=kv_budget, max_batch=max_batch,
                      admit_check=admit_check, chunk=chunk, share=share, stats=stats, parent_first=bool(keyless))
    return _Run(module, kernel, store, sched, rope, _requests(prompts, rules, device, seed),
                read_ahead=2 * (max_batch or 64), logprobs=logprobs, stats=stats, progress=progress,
                vision=vision, samples=rules.samples)


class _Limits:
    """What one request may need: the model's position table, ``kv_budget``, and ``token_budget`` where prompts
    run whole; :meth:`check` refuses a request that needs more, naming it and the limit."""

    def __init__(self, name: str, positions: int | None, kv_budget: int, token_budget: int, chunk: bool, rope):
        self.name, self.positions, self.kv_budget, self.token_budget = name, positions, kv_budget, token_budget
        self.chunk, self.rope = chunk, rope

    def check(self, index: int, n: int, max_length: int) -> None:
        """Refuse request ``index`` (an ``n``-token prompt, decoding up to ``max_length``) if it cannot run."""
        need_kv = max_length - 1  # the last new token is never fed back
        if self.positions is not None and need_kv > self.positions:
            raise ValueError(
                f"request {index} needs {need_kv} positions ({n} prompt + {max_length - n} new tokens, the last not fed "
                f"back) but {self.name}'s position table holds {self.positions}; lower max_new_tokens to at most "
                f"{self.positions - n + 1} or shorten the prompt (model.generate would fail with an IndexError)"
            )
        if need_kv > self.kv_budget or (not self.chunk and n > self.token_budget):
            over_kv = need_kv > self.kv_budget
            name, limit, have = ("kv_budget", self.kv_budget, need_kv) if over_kv else ("token_budget", self.token_budget, n)
            why = ""
            if name == "token_budget":
                why = (f"; {self.name}'s rotary frequencies depend on the length, so its prompts are not chunked"
                       if self.rope is not None else "; a prompt with images runs whole, so it is not chunked")
            raise ValueError(
                f"request {index} needs {have} tokens ({n} prompt, at most {max_length - n} new) but {name} is {limit} "
                f"(raise {name}){why}"
            )


class _Run:
    """One decode run: the requests read so far, the scheduler and store, and the model call; :meth:`step` runs a step."""

    def __init__(self, module, kernel, store: KVStore, sched: Scheduler, rope, requests: Iterator[Request], *,
                 read_ahead: int, logprobs: bool, stats: EngineStats, progress, vision=None, samples: int = 1):
        self.module, self.kernel, self.store, self.sched, self.rope = module, kernel, store, sched, rope
        self.base = base_model(module)  # called instead of the model in a step that keeps no logits
        self.vision, self.samples = vision, samples  # each step's images and mRoPE positions go in at the model call
        self.requests, self.read_ahead, self.waiting = requests, read_ahead, deque()
        self.logprobs, self.stats, self.progress = logprobs, stats, progress
        self.start = time.perf_counter()

    def step(self) -> list[Completion] | None:
        """Schedule, run one packed forward, choose each sampling request's token: the requests that finished
        (None once nothing is left)."""
        self._read()
        feeds, units = self.sched.next_step(self.waiting)        # decode rows, then prompt chunks, then new requests
        if not feeds:
            return self._nothing_left()
        reqs, logits = _step(self, feeds, units)                 # (n,) requests, (n, V) float32
        reqs, logits = self._with_first_tokens(reqs, logits)
        self.sched.fed(feeds, units)
        tokens, lps = _choose(reqs, logits, self.store.device, self.logprobs)
        self._count(feeds, units, len(reqs))
        return self._append(reqs, tokens, lps)                   # finished requests leave; their keys are freed

    def _read(self) -> None:
        """Read prompts ahead, lazily: the scheduler chooses shared prefixes among the waiting ones."""
        while len(self.waiting) < self.read_ahead and (r := next(self.requests, None)) is not None:
            self.waiting.append(r)

    def _nothing_left(self) -> None:
        if self.sched.running or self.waiting:
            raise RuntimeError("prepack's engine planned an empty step with requests left (a scheduling bug)")
        return None

    def _with_first_tokens(self, reqs: list, logits: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Add the requests whose whole prompt is a region that has its last-token logits now."""
        ready = self.sched.first_tokens()
        if not ready:
            return reqs, logits
        return reqs + ready, torch.cat([logits, torch.stack([r.prefix.last_logits for r in ready])])

    def _count(self, feeds: dict, units: dict, sampled: int) -> None:
        stats, store = self.stats, self.store
        stats.steps += 1
        stats.batch_sizes.append(sum(1 for k in feeds if k >= 0))
        stats.decode_rows.append(sum(1 for k in feeds if k >= 0 and units[k].tokens))
        stats.prompt_tokens.append(sum(n for k, n in feeds.items() if k < 0 or not units[k].tokens))
        stats.peak_live_tokens = max(stats.peak_live_tokens, store.live_tokens())
        stats.tokens += sampled
        stats.peak_kv_bytes, stats.kv_bytes_per_token = store.peak_bytes, store.bytes_per_token()
        stats.step_end_s.append(time.perf_counter() - self.start)
        if self.progress is not None:
            self.progress.set_postfix(tokens=stats.tokens, refresh=False)

    def _append(self, reqs: list, tokens: list[int], lps: list) -> list[Completion]:
        """Give each request its new token; the ones that stop (generate's criteria, on their own ids) finish."""
        finished, now = [], time.perf_counter() - self.start
        for r, tok, lp in zip(reqs, tokens, lps, strict=True):
            if not r.tokens:
                self.stats.first_token_s[r.index] = now
            r.tokens.append(tok)
            if self.logprobs:
                r.logprobs.append(lp)
            r.pending = np.array([tok], np.int64)
            reason = _finished(r, self.store.device)
            if reason is None:
                continue
            self.sched.finish(r)
            finished.append(Completion(
                r.index, torch.tensor(r.tokens, dtype=torch.long),
                torch.tensor(r.logprobs, dtype=torch.float32) if self.logprobs else None, reason,
            ))
            if self.progress is not None:
                self.progress.update(1)
        return finished


def _requests(prompts: Iterable[np.ndarray], rules: Rules, device, seed: int) -> Iterator[Request]:
    """Each prompt's ``rules.samples`` requests, numbered prompt-major, each with its rules and generator."""
    index = itertools.count()
    for p, prompt in enumerate(prompts):
        for _ in range(rules.samples):
            i = next(index)
            # each request gets rules of its own: its own copies of processors and criteria that keep state, its batch id
            own = rules.for_request(torch.from_numpy(prompt), device, index=p, request=i, quiet=i > 0)
            gen = None
            if own.do_sample:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed + i)
            yield Request(i, prompt, own, gen)


def _step(run: "_Run", feeds: dict, units: dict) -> tuple[list, torch.Tensor]:
    """One step: feeds[key] tokens of each unit; the requests that sample, in stream order, and their (n, V) float32
    logits. One packed forward, or with length-dependent RoPE one per group of requests whose own forward would get
    the same rotary frequencies (:func:`prepack.executor.step.rope_groups`)."""
    reqs, logits = [], []
    for group in rope_groups(feeds, units, run.rope, type(unwrap(run.module)).__name__):
        got, out = _forward_step(run, group, units)
        reqs += got
        logits.append(out)
    return reqs, torch.cat(logits) if len(logits) > 1 else logits[0]


def _check_rope(model, rope: RopeDependence, r: Request) -> None:
    """Refuse a request whose decoding would cross a change of rotary frequencies, before it runs.

    Alone, such a request's frequencies change mid-generation, and what ``model.generate`` then does is
    the model's own (Phi-3 recomputes the whole cache with the long factors when it first crosses
    ``original_max_position_embeddings``; other models keep the cached keys): prepack does not guess.
    """
    first, last = len(r.prompt), r.rules.max_length - 1  # the positions its prefill and its last step reach
    name = type(model).__name__
    why = rope.refusal(last)
    if why:
        raise UnsupportedModelError(f"request {r.index} has {last} tokens but {name}'s {why}")
    if rope.key(first) != rope.key(last):
        raise UnsupportedModelError(
            f"request {r.index} has {first} tokens and would decode up to {last} positions, across the point where "
            f"{name}'s length-dependent RoPE changes its frequencies (generate's behaviour there is the model's "
            "own); prepack decodes such a prompt only where it stays on one side: lower max_new_tokens or pad the prompt"
        )


def _forward_step(run: "_Run", feeds: dict, units: dict) -> tuple[list, torch.Tensor]:
    """One packed forward: ``feeds[key]`` pending tokens of each unit. Returns the requests that sample (fed all they
    had pending), in stream order, and their (n, V) float32 logits.
    """
    def last_rows(fed):  # the last token of each segment that feeds all it had pending
        return (fed.start + fed.q - 1)[[n == len(u.pending) for u, n in zip(fed.units, fed.q)]]

    fed, out = forward_step(run.module, run.kernel, run.store, feeds, units, last_rows, base=run.base,
                            vision=run.vision, samples=run.samples, held=run.store.states)
    samples = [u for u, n in zip(fed.units, fed.q) if n == len(u.pending)]
    logits = out.float()
    is_request = [isinstance(u, Request) for u in samples]
    for j, u in enumerate(samples):
        if not is_request[j]:
            # a region that feeds its last tokens keeps its logits for the requests whose whole prompt it is
            u.last_logits = logits[j].clone()  # a copy: a view would keep the whole step's (n, V) logits alive
    if all(is_request):
        return samples, logits
    rows = torch.tensor([j for j, ok in enumerate(is_request) if ok], dtype=torch.long, device=logits.device)
    return [u for u, ok in zip(samples, is_request) if ok], logits.index_select(0, rows)


def cache_slides(model) -> list[bool]:
    """Per layer, whether a ``DynamicCache`` built for ``model`` drops keys outside a sliding window (or chunk)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=unwrap(model).config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - a config transformers cannot lay a cache out for: nothing to compare
        return []
    return [bool(getattr(layer, "is_sliding", False)) for layer in cache.layers]


def _choose(reqs: list, logits: torch.Tensor, device, logprobs: bool) -> tuple[list[int], list]:
    """Each request's next token (its processors, then argmax or a draw from its own generator), and its log-prob.

    Requests whose processors are only transformers' row-wise warpers (temperature, top-k, top-p, min-p: each row
    of the scores on its own, the ids unread) are warped together with per-row settings
    (:func:`~prepack.jobs.sampling.warp_rows`); the others call their own processors on their own ids. Every
    sampling request then draws from its own generator (:func:`~prepack.jobs.sampling.draw`): what each would
    get alone.
    """
    chosen = logits.argmax(-1)  # every greedy request without processors: one argmax, no copy of the (n, V) logits
    rows, scores = _processed(reqs, logits, device)              # (k,) rows with processors or sampling, (k, V)
    if rows:
        sample = [j for j, i in enumerate(rows) if reqs[i].rules.do_sample]
        greedy = [j for j, i in enumerate(rows) if not reqs[i].rules.do_sample]
        if greedy:
            at = torch.tensor([rows[j] for j in greedy], device=logits.device)
            chosen.index_copy_(0, at, scores[greedy].argmax(-1))
        if sample:
            at = torch.tensor([rows[j] for j in sample], device=logits.device)
            probs = torch.softmax(scores if len(sample) == len(rows) else scores[sample], dim=-1)
            chosen.index_copy_(0, at, draw(probs, [reqs[rows[j]].generator for j in sample]).to(chosen.device))
    lps = [None] * len(reqs)
    if logprobs:
        temp = torch.tensor([r.rules.temperature for r in reqs], device=logits.device)[:, None]
        lps = torch.log_softmax(logits / temp, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
    return chosen.tolist(), lps


def _processed(reqs: list, logits: torch.Tensor, device) -> tuple[list[int], torch.Tensor | None]:
    """The rows that sample or have processors, and their (k, V) processed scores: row-wise warper lists together
    (grouped by the steps they take), any other list called on the request's own (1, L) ids."""
    groups: dict = {}
    for i, r in enumerate(reqs):
        if not r.rules.do_sample and not len(r.rules.processors):
            continue
        groups.setdefault(row_wise_steps(r.rules.processors), []).append(i)
    rows, parts = [], []
    for steps, members in groups.items():
        if steps is None:
            for i in members:
                r = reqs[i]
                parts.append(r.rules.processors(_ids(r, device), logits[i : i + 1].clone()))
        else:
            at = torch.tensor(members, device=logits.device)
            parts.append(warp_rows(logits.index_select(0, at), [reqs[i].rules.processors for i in members], steps))
        rows += members
    return rows, (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None


def _ids(r: Request, device) -> torch.Tensor:
    """(1, L) r's prompt and new tokens so far (a view of a buffer grown in place, never rebuilt)."""
    if r.rules.history is None:
        r.rules.history = IdsBuffer(r.prompt, r.rules.max_length, device)
    return r.rules.history.view(r.tokens)


def _finished(r: Request, device) -> str | None:
    """Why ``r`` stops after its newest token (generate's criteria, on its own ids), or None."""
    if r.tokens[-1] in r.rules.eos:
        return "eos"
    if len(r.prompt) + len(r.tokens) >= r.rules.max_length:
        return "length"
    if len(r.rules.criteria) and bool(r.rules.criteria(_ids(r, device), None).any()):
        return "stop"
    return None


def check_engine_model(model) -> None:
    """Refuse a model whose per-layer state is neither attention keys and values nor a mixer's state
    (:mod:`prepack.mixers`), naming the model and why."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    keyless = keyless_layers(model)
    types = getattr(config, "layer_types", None) or ()
    other = sorted({t for i, t in enumerate(types) if t not in _ATTENTION_LAYERS and i not in keyless})
    if other:
        raise UnsupportedModelError(
            f"{name} has {', '.join(other)} layers that are neither attention nor a token mixer prepack keeps the "
            "state of (prepack.mixers), so its decode engine cannot hold what they carry from token to token"
        )
    kv_share_sources(config)  # layers reading another's keys read its pool (KVStore.reads); refuses what it cannot map


def _budget(value, name: str, default: int) -> int:
    return default if value is None else positive_integer(value, name)


def position_limit(model) -> int | None:
    """Positions a learned absolute position table holds (GPT-2's ``wpe``, OPT's ``embed_positions``), or None
    for a model without one (RoPE, ALiBi, sinusoidal: ``model.generate`` runs past ``max_position_embeddings``)."""
    base = unwrap(model)
    decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
    for name, m in (decoder if isinstance(decoder, torch.nn.Module) else base).named_modules():  # not a vision tower's
        if isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings"):
            return m.num_embeddings - int(getattr(m, "offset", 0) or 0)  # OPT's table starts at offset 2
    return None


def default_kv_budget(model) -> int:
    """Keys the store may reserve when the caller sets no ``kv_budget``: 262144 on CPU; on CUDA what half
    the free memory holds at the config's bytes per cached token."""
    device = model_device(model)
    if device.type != "cuda":
        return 262144
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", 32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    per_token = 2 * config.num_hidden_layers * kv_dim * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(free // 2 // per_token, 4096))
