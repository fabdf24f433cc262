"""What each decode-engine step feeds: decode rows first, then prompt chunks, then newly admitted prompts.

One step's tokens stay within ``token_budget``. Every running request that has produced a token feeds
it back (one token: a decode row); what budget is left goes, in admission order, to the prompts still
being prefilled, a chunk each (a prompt longer than the budget is prefilled over several steps, its
chunks continuing its own earlier keys, beside the running decodes: Sarathi-Serve's stall-free
batches); then waiting requests are admitted while the budget, ``kv_budget`` (each running request
reserves its prompt plus its most new tokens) and ``max_batch`` allow.

With ``share=True`` an admitted request may read prefix regions held once for several requests, at
any depth (the rule is :mod:`prepack.executor.regions`'): a region is a unit of its own that feeds its
tokens (in chunks, like a prompt) after its parent's and never samples; a request or a child region
feeds its own tokens only once its parent region is complete (in the same step at the earliest). A
request whose whole prompt is a region takes its first token from the region's last-token logits.
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np

from ..jobs.decoding import RequestRules
from .kvstore import KVStore
from .regions import live_match, next_region_end


class Request:
    """A request: its prompt, rules, what it generated and what it has still to feed.

    ``pending`` is what the request has not fed yet: its prompt (after its prefix regions) until that is
    all in the cache, then its newest token. ``prefix`` is the deepest prefix region it reads (its
    ancestors come with it) and ``offset`` that region's end: where its own positions start.
    """

    __slots__ = ("index", "prompt", "rules", "generator", "tokens", "logprobs", "pending", "prefix", "offset")

    def __init__(self, index: int, prompt: np.ndarray, rules: RequestRules, generator):
        self.index, self.prompt, self.rules, self.generator = index, prompt, rules, generator
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.pending = prompt
        self.prefix: Prefix | None = None
        self.offset = 0

    @property
    def key(self) -> int:
        return self.index

    @property
    def most(self) -> int:
        """The most keys it will hold: its prompt and its new tokens, the last one never fed back."""
        return self.rules.max_length - 1

    @property
    def shareable(self) -> np.ndarray:
        """The prompt prefix it may read from a shared region: all of it (its first token comes from the region's logits)."""
        return self.prompt

    splittable = True  # its prompt may be fed over several steps


class Prefix:
    """A prefix region shared by several requests; its key is negative.

    Attributes:
        tokens: (L,) int64, the prompt prefix it ends (its parent's tokens, then its own).
        prefix: its parent region, or None; offset: the parent's end, where its own tokens start.
        pending: its own tokens not fed yet.
        last_logits: (V,) float32 logits after its last token, once computed: the first-token
            distribution of a request whose whole prompt it is.
    """

    __slots__ = ("key", "tokens", "pending", "prefix", "offset", "last_logits", "pieces")
    splittable = True  # its tokens may be fed over several steps

    def __init__(self, key: int, tokens: np.ndarray, parent: "Prefix | None" = None):
        self.key, self.tokens, self.prefix = key, tokens, parent
        self.offset = 0 if parent is None else len(parent.tokens)
        self.pending = tokens[self.offset:]
        self.last_logits = None
        self.pieces: list = []  # prefill-only runs: (step, start, size) where its tokens sit in the steps' records


class Scheduler:
    """The engine's running set, its budgets and its prefix regions; :meth:`next_step` plans one step.

    Args:
        admit_check: called with each request before it is admitted (raises to refuse it).
        chunk: whether a prompt may be fed over several steps (else one longer than the budget is refused).
        share: whether admitted requests may read shared prefix regions.
        parent_first: a unit continues its prefix region only from the step after the region's last tokens (a
            model whose token mixers carry state: the region's final state must exist before a child copies it).
    """

    def __init__(self, store: KVStore, *, token_budget: int, kv_budget: int, max_batch: int | None,
                 admit_check, chunk: bool, share: bool, stats, read_ahead: int | None = None, parent_first: bool = False):
        self.store, self.token_budget, self.kv_budget, self.max_batch = store, token_budget, kv_budget, max_batch
        self.admit_check, self.chunk, self.share, self.stats = admit_check, chunk, share, stats
        self.parent_first = parent_first
        self.running: dict[int, Request] = {}  # admission order
        self.prefilling: list = []  # requests and prefix regions with prompt tokens still to feed, admission order
        self.live: dict[int, Prefix] = {}
        self.awaiting: list[Request] = []  # requests whose whole prompt is a region: first token from its logits
        self.reserved: dict[int, int] = {}  # request or region -> keys reserved
        self._keys = itertools.count(-1, -1)
        self.read_ahead = read_ahead  # waiting prompts a new region is chosen for (None: all of them)

    def next_step(self, waiting: deque) -> tuple[dict, dict]:
        """Plan one step: ``(feeds, units)``, per unit key the tokens it feeds and the unit (request or region)."""
        budget = self.token_budget
        feeds, units = {}, {}
        for r in self.running.values():  # decode rows first: a long prompt never stalls them
            if r.tokens:
                feeds[r.key], units[r.key] = 1, r
        budget -= len(feeds)
        budget = self._feed_prompts(self.prefilling, feeds, units, budget)
        # at most token_budget requests run, so their decode rows always fit one step
        most = self.token_budget if self.max_batch is None else min(self.max_batch, self.token_budget)
        while waiting and budget > 0 and len(self.running) < most:
            r = waiting[0]
            self.admit_check(r)
            new = self._admit(r, budget, [w.shareable for w in itertools.islice(waiting, 1, self.read_ahead)])
            if new is None:
                break
            waiting.popleft()
            budget = self._feed_prompts(new, feeds, units, budget)
        return feeds, units

    def _feed_prompts(self, todo: list, feeds: dict, units: dict, budget: int) -> int:
        """Give each unit of ``todo`` a chunk of what budget is left (a sharer only once its region is complete)."""
        for u in todo:
            if budget <= 0:
                break
            if u.prefix is not None and len(u.prefix.pending) > (0 if self.parent_first else feeds.get(u.prefix.key, 0)):
                continue  # its parent region is not all in the cache by the end of this step (or, parent_first, before it)
            n = min(len(u.pending), budget)
            if n < len(u.pending) and not (self.chunk and u.splittable):
                break
            feeds[u.key], units[u.key] = n, u
            budget -= n
        return budget

    def _admit(self, r: Request, budget: int, behind: list) -> list | None:
        """Admit ``r`` if the budgets allow: the units it adds to the prefilling ones (new regions first), or None.

        ``behind``: the prompts waiting after it, which new regions are chosen for.
        """
        region, ends = None, []
        if self.share:
            key = live_match(r.shareable, {k: p.tokens for k, p in self.live.items()})
            region = None if key is None else self.live[key]
            matched = 0 if region is None else len(region.tokens)
            while (end := next_region_end(r.shareable, matched, behind)) > matched:
                ends.append(end)
                matched = end
        held = ends[-1] if ends else len(region.tokens) if region is not None else 0
        own = r.most - held
        new_keys = held - (len(region.tokens) if region is not None else 0)
        if sum(self.reserved.values()) + own + new_keys > self.kv_budget:
            return None
        if not (self.chunk and r.splittable) and len(r.prompt) > budget:
            return None
        new = []
        if region is not None:
            self.stats.shared_prefix_tokens += len(region.tokens)  # computed once already: saved here
        for end in ends:
            child = Prefix(next(self._keys), r.prompt[:end], region)
            if region is not None:
                self.store.attach(child.key, region.key)
            self.live[child.key], self.reserved[child.key] = child, len(child.pending)
            self.store.reserve(child.key, len(child.pending))
            self.stats.prefix_regions += 1
            new.append(child)
            region = child
        if region is not None:
            r.prefix, r.offset, r.pending = region, len(region.tokens), r.prompt[len(region.tokens):]
            self.store.attach(r.index, region.key)
            if not len(r.pending):
                self.awaiting.append(r)
        self.running[r.index], self.reserved[r.index] = r, own
        self.store.reserve(r.index, own)
        if len(r.pending):
            new.append(r)
        self.prefilling += new
        return new

    def first_tokens(self) -> list[Request]:
        """The requests whose whole prompt is a region that has its last-token logits now (they leave ``awaiting``)."""
        return self.ready(lambda r: r.prefix.last_logits is not None)

    def ready(self, done) -> list:
        """The requests of ``awaiting`` (whose whole prompt is a region) for which ``done(r)`` holds; they leave it."""
        ready = [r for r in self.awaiting if done(r)]
        self.awaiting = [r for r in self.awaiting if not done(r)]
        return ready

    def fed(self, feeds: dict, units: dict) -> None:
        """Drop what the step fed from each unit's pending tokens."""
        for key, n in feeds.items():
            u = units[key]
            u.pending = u.pending[n:]
        self.prefilling = [u for u in self.prefilling if len(u.pending)]

    def finish(self, r: Request) -> None:
        """Free a finished request's keys (and its region's with the last sharer) and its reservation."""
        for key in self.store.free(r.index):
            self.reserved.pop(key, None)
            self.live.pop(key, None)
        del self.running[r.index]
