"""The decode engine's KV store: one growing, contiguous region per request in per-layer pools.

Every layer keeps one pool of keys and one of values, each (P, H_kv, D) on the model's device.
Request ``r`` owns the pool rows ``[start_r, start_r + capacity_r)``; its ``length_r`` real
keys fill the front of that region. A step appends the new tokens' keys after each request's
real ones (one ``index_copy_`` per layer and tensor) and hands attention the pool itself, a
view: the stream of keys is cut into segments so that each request's queries see exactly its
own real keys, and every stretch of pool that belongs to no query (spare capacity, freed
regions) is a segment with no queries, which a varlen kernel never reads. So no step copies
the cache, and attention reads no padding.

Memory follows live tokens: a region grows by ``growth`` (relocated to the top of the pool when
its neighbour is in the way, an amortised O(1) copy per token), a finished request's region is
free at once, and when the top of the pool is reached the live regions are compacted to the
bottom before the pool itself grows (by ``growth``). Host-side bookkeeping is numpy/Python only;
the per-step plan (:class:`StepKV`) is built once and read by every layer.

A prompt prefix that several requests share is held once, in a region of its own keyed by a
negative number: :meth:`KVStore.attach` makes a request (or a child region) read it before its own
keys, so regions form a tree, and a region is freed with the last request or region attached to it
(a reference count). Its keys are counted once in :meth:`KVStore.live_tokens` and in the pools'
bytes. Attention over a sharer's regions is merged from parts (:mod:`prepack.attention.cascade`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..planner import layout
from ..attention.cascade import shared_parts
from .call import StepLayout, check_layer_idx
from ..hf.support import UnsupportedModelError


class KVStore:
    """Per-layer key/value pools with one growing region per request.

    Args:
        device: where the pools live (the model's device).
        growth: a region, and the pool, grow to ``growth`` times what they must hold (> 1).
        slack: tokens of spare capacity a new region gets beyond what it must hold.
        split_chunks: attend a prompt chunk's earlier keys and its own as two merged parts
            (:func:`prepack.attention.cascade.shared_parts`); only for plain causal softmax attention.
        slides: per layer, whether the model's own cache keeps only a sliding window of keys
            (:func:`prepack.jobs.engine.cache_slides`): such a layer's attention must apply a window.
        reads: layer -> the earlier layer whose keys and values it reads (cross-layer KV sharing,
            :func:`prepack.hf.support.kv_share_sources`): such a layer has no pool of its own.
        revisits: the model runs attention at one layer index several times in a forward, each over a key/value
            stream of its own (:func:`prepack.hf.support.revisiting_attention`): the k-th call at a layer index in a
            step reads and writes the pool ``(layer_idx, k)`` (k >= 1; the first call's pool is ``layer_idx``).
        keyless: layers that cache no keys (a token mixer's outside attention, an MLP-only layer's).

    Attributes:
        states: for a model with such mixers, each request's and region's conv / recurrent states
            (:class:`prepack.mixers.states.HeldStates`, set by the engine), freed with its keys; or None.
    """

    def __init__(self, device, *, growth: float = 1.125, slack: int = 16, split_chunks: bool = False, slides=(), reads=None,
                 keyless=frozenset(), revisits: bool = False):
        if not growth > 1:
            raise ValueError(f"growth must be > 1, got {growth!r}")
        self.device, self.growth, self.slack = torch.device(device), growth, slack
        self.split_chunks = split_chunks
        self.slides = tuple(slides)  # per layer: whether the model's own cache keeps only a sliding window of keys
        self.reads = dict(reads or {})  # layer -> the layer whose pool it reads (KV sharing); it writes none
        self.keyless, self.states = frozenset(keyless), None
        self.revisits = revisits
        if revisits and self.reads:
            raise UnsupportedModelError("a model that both revisits attention layers and shares keys across layers is not implemented")
        self.start: dict[int, int] = {}  # request -> first pool row of its region
        self.capacity: dict[int, int] = {}  # request -> rows of its region
        self.length: dict[int, int] = {}  # request -> real keys cached
        self.top = 0  # pool rows in use or garbage below this row; free above it
        self.size = 0  # pool rows allocated per layer
        self.pools: dict = {}  # layer_idx (or (layer_idx, visit), :attr:`revisits`) -> (keys, values), (P, H_kv, D)
        self.peak_bytes = 0
        self.prefix_of: dict[int, int] = {}  # request or region -> the prefix region it continues
        self.sharers: dict[int, int] = {}  # prefix region (a negative key) -> requests and regions attached to it
        self.most: dict[int, int] = {}  # request or region -> the most keys it will hold, where known

    # ---- bookkeeping -------------------------------------------------------------------------------
    def live_tokens(self) -> int:
        return sum(self.length.values())

    def bytes(self) -> int:
        """Bytes the pools hold now (every layer, keys and values)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.pools.values())

    def bytes_per_token(self) -> int:
        """Bytes one cached token takes over all layers (0 before the first step)."""
        return sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in self.pools.values())

    def attach(self, request: int, prefix: int) -> None:
        """Make ``request`` (a request, or a region: a child) read prefix region ``prefix`` (key < 0) before its
        own keys; counts a reference. ``prefix``'s own ancestors come before it."""
        if prefix >= 0:
            raise ValueError(f"prefix regions have negative keys, got {prefix}")
        if request in self.prefix_of:
            raise ValueError(f"request {request} already reads prefix {self.prefix_of[request]}")
        self.prefix_of[request] = prefix
        self.sharers[prefix] = self.sharers.get(prefix, 0) + 1

    def reserve(self, key: int, most: int) -> None:
        """``key`` will never hold more than ``most`` keys: its region grows no further than that."""
        self.most[key] = most

    def chain(self, key: int) -> list[int]:
        """The prefix regions ``key`` continues, nearest first."""
        out = []
        while (key := self.prefix_of.get(key)) is not None:
            out.append(key)
        return out

    def free(self, request: int) -> list[int]:
        """Release ``request``'s region at once (its rows become garbage until the next compaction).

        Each prefix region it continues goes with it when nothing else reads it. Returns the keys freed.
        """
        freed = [request]
        prefix = self.prefix_of.pop(request, None)
        while prefix is not None:
            self.sharers[prefix] -= 1
            if self.sharers[prefix]:
                break
            del self.sharers[prefix]
            freed.append(prefix)
            prefix = self.prefix_of.pop(prefix, None)
        for key in freed:
            for d in (self.start, self.capacity, self.length, self.most):
                d.pop(key, None)
        if self.states is not None:
            self.states.drop(freed)
        if not self.start:  # nothing live: the whole pool is free again
            self.top = 0
        return freed

    # ---- one step ----------------------------------------------------------------------------------
    def plan(self, new: dict[int, int]) -> "StepKV":
        """Make room for ``new[r]`` more keys of each request ``r`` and lay out the step.

        ``new`` holds the requests (and prefix regions) that feed tokens this step; a key not yet in the
        store starts empty. Returns the step's :class:`StepKV`; its ``order`` is the order the step's
        query stream must follow.
        """
        for r, q in new.items():
            if r not in self.start:  # a new request: an empty region at the top, grown below
                self.start[r], self.capacity[r], self.length[r] = self.top, 0, 0
            if self.length[r] + q > self.capacity[r]:
                self._grow_region(r, self.length[r] + q)
        order = sorted(new, key=self.start.__getitem__)
        return self._layout(order, new)

    def _grow_region(self, r: int, need: int) -> None:
        """Give request ``r`` a region of at least ``need`` rows (``growth`` times it, plus ``slack``)."""
        cap = int(math.ceil(need * self.growth)) + self.slack
        if r in self.most:  # no room past what it can ever hold (a request's prompt and new tokens, a region's length)
            cap = max(min(cap, self.most[r]), need)
        extra = cap - self.capacity[r] if self._is_last(r) else cap
        if self.top + extra > self.size:
            self._compact()  # reuse freed rows before growing the pool; ``r`` may end up last
        if self._is_last(r):  # nothing above it: grow in place
            if self.start[r] + cap > self.size:
                self._resize(max(int(math.ceil(self.size * self.growth)), self.start[r] + cap))
            self.capacity[r] = cap
            self.top = self.start[r] + cap
            return
        if self.top + cap > self.size:
            self._resize(max(int(math.ceil(self.size * self.growth)), self.top + cap))
        old, n = self.start[r], self.length[r]
        self.start[r], self.capacity[r] = self.top, cap
        self.top += cap
        if n:
            self._move([(old, self.start[r], n)])

    def _is_last(self, r: int) -> bool:
        return self.start[r] + self.capacity[r] == self.top

    def _compact(self) -> None:
        """Move every live region down to the bottom of the pool, in pool order (freed rows reused)."""
        keep = sorted(self.start, key=self.start.__getitem__)
        moves, cursor = [], 0
        for r in keep:
            n = self.length[r]
            if self.start[r] != cursor and n:
                moves.append((self.start[r], cursor, n))
            self.start[r] = cursor
            cursor += self.capacity[r]
        self._move(moves)
        self.top = cursor

    def _move(self, moves: list[tuple[int, int, int]]) -> None:
        """Copy pool rows ``[src, src + n)`` to ``[dst, dst + n)`` for each (src, dst, n), in order, in every layer.

        Whole ranges are copied as slices (a region's rows are contiguous); a range that overlaps its
        destination (a compaction moving a region down by less than its length) is copied via a clone.
        Every move goes down or to free rows above the top, so in order no move overwrites a later one's source.
        """
        for pool in self.pools.values():
            for x in pool:
                for src, dst, n in moves:
                    rows = x[src:src + n]
                    x[dst:dst + n] = rows.clone() if abs(src - dst) < n else rows

    def _resize(self, size: int) -> None:
        for i, (k, v) in list(self.pools.items()):
            self.pools[i] = tuple(_grown(x, size, self.top) for x in (k, v))
        self.size = size
        self._note_peak()

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.bytes())

    def _layout(self, order: list[int], new: dict[int, int]) -> "StepKV":
        starts = np.array([self.start[r] for r in order], np.int64)
        cached = np.array([self.length[r] for r in order], np.int64)
        q = np.array([new[r] for r in order], np.int64)
        dst = layout.ranges(starts + cached, q)  # where the new keys go, in query-stream order
        gap = starts - np.concatenate([[0], (starts + cached + q)[:-1]])
        for r, n in new.items():
            self.length[r] += n
        q_lengths, k_lengths = _segments(gap, q, cached)
        end = int((starts + cached + q).max()) if len(order) else 0
        regions = {p: (self.start[p], self.length[p]) for p in self.sharers if p in self.start}
        chains = {key: self.chain(key) for key in order}
        parts = shared_parts(order, q, cached, starts, chains, regions, self.device, split_chunks=self.split_chunks)
        base = None
        if parts is not None:
            # the kernel's own layout for the other rows: the merged rows' keys fold into the gap before them
            base_q, base_k = _segments(gap, q, cached, parts.taken)
            reach = max((s + n for s, n, _ in parts.groups), default=0)
            if reach > end:  # the prefixes read may lie above the last segment: cover them with a keyless one
                q_lengths, k_lengths = np.append(q_lengths, 0), np.append(k_lengths, reach - end)
                base_q, base_k = np.append(base_q, 0), np.append(base_k, reach - end)
                end = reach
            base = StepLayout(base_q, base_k, self.device)
        return StepKV(self, order, q, cached, dst, q_lengths, k_lengths, end, parts, base)


def _segments(gap: np.ndarray, q: np.ndarray, cached: np.ndarray, taken: np.ndarray | None = None):
    """(q_lengths, k_lengths) of the step's segments: a keyless-query gap before each request's region,
    then its real keys. A ``taken`` request keeps its queries but lends its keys to the gap before it,
    so the kernel gives its rows nothing to attend to (they are computed elsewhere)."""
    own = cached + q
    if taken is not None:
        gap, own = gap + np.where(taken, own, 0), np.where(taken, 0, own)
    q_lengths = np.stack([np.zeros_like(q), q], 1).reshape(-1)
    k_lengths = np.stack([gap, own], 1).reshape(-1)
    keep = (k_lengths > 0) | (q_lengths > 0)  # drop empty gaps: fewer segments for the kernel
    keep[1::2] = True
    return q_lengths[keep], k_lengths[keep]


def _grown(x: torch.Tensor, size: int, used: int) -> torch.Tensor:
    out = x.new_zeros(size, *x.shape[1:])
    out[:used] = x[:used]
    return out


class StepKV:
    """One step's view of the store: what each layer appends and which keys each segment reads.

    Attributes:
        order: the step's requests in query-stream order.
        q: (n,) int64, new tokens per request; cached: (n,) int64, keys each had before the step.
        layout: the :class:`~prepack.executor.call.StepLayout` over the pool (gap segments have 0 queries); a
            sharer's segment holds its own keys only, its prefix part is ``parts``'.
    """

    def __init__(self, store: KVStore, order, q, cached, dst, q_lengths, k_lengths, end: int, parts=None, base=None):
        self.store, self.order, self.q, self.cached, self.end = store, order, q, cached, end
        self.parts = parts  # the queries merged from parts (:class:`prepack.attention.cascade.SharedParts`), or None
        self.base_layout = base  # with parts: the layout the kernel runs for the other queries
        self.dst = torch.from_numpy(dst).to(store.device)
        self.layout = StepLayout(q_lengths, k_lengths, store.device)
        self._written: set[int] = set()  # layers whose keys this step holds: a second write would overwrite them
        self._visits: dict[int, int] = {}  # with store.revisits: layer -> calls at it this step after the first
        self._new: dict[int, tuple] = {}  # a layer others read -> the (key, value) tensors it wrote this step
        self._shared_calls: dict[int, int] = {}  # an attention module shared by layers -> its calls so far this forward

    def shared_layer(self, module) -> tuple:
        """The pool key of an attention block that several layers share (Zamba's): its n-th call in a forward
        is the n-th layer it serves, in every forward alike (the decoder's layer order)."""
        n = self._shared_calls.get(id(module), 0)
        self._shared_calls[id(module)] = n + 1
        return ("shared", id(module), n)

    def extend(self, layer_idx, key, value, window=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, T, D) keys/values of the step's new tokens -> (1, H_kv, end, D) views of the layer's pool.

        The new keys are written after each request's cached ones; the returned stream is the pool up
        to the last real key, cut into segments by :attr:`layout`. ``window``: the sliding window or chunk
        the layer's attention applies; a layer whose own cache keeps only a window of keys
        (:attr:`KVStore.slides`, known from the config before the first step) must apply one.
        """
        check_layer_idx(layer_idx)
        if key.shape[0] != 1:
            raise UnsupportedModelError(f"layer {layer_idx} got keys of batch {key.shape[0]}; the engine runs one packed stream")
        if layer_idx in self.store.reads:
            return self._read_shared(layer_idx, key, value, window)
        pool = layer_idx
        if layer_idx in self._written:
            if not self.store.revisits:
                raise UnsupportedModelError(
                    f"layer {layer_idx} went through attention twice in one forward; prepack's engine keeps one "
                    "key/value stream per layer unless the model's attention class is known to give each call a "
                    "stream of its own (prepack.hf.support.REVISITING_ATTENTION), so it cannot decode this model exactly"
                )
            # the k-th call at this layer index: a stream of its own, the same one at every step (calls come in model order)
            self._visits[layer_idx] = self._visits.get(layer_idx, 0) + 1
            pool = (layer_idx, self._visits[layer_idx])
        store = self.store
        if isinstance(layer_idx, int) and layer_idx < len(store.slides) and store.slides[layer_idx] and not window:
            raise UnsupportedModelError(
                f"layer {layer_idx}'s cache keeps only a sliding window of keys, but its attention applies no window, "
                "so transformers' own decoding attends to fewer keys than its prefill did; prepack's decode engine "
                "cannot reproduce that exactly"
            )
        self._written.add(layer_idx)
        if layer_idx in store.reads.values():
            self._new[layer_idx] = (key, value)
        if pool not in store.pools:  # the first step: every layer's pool at the size planned
            store.pools[pool] = tuple(x.new_zeros(store.size, x.shape[1], x.shape[3]) for x in (key, value))
        pool_k, pool_v = store.pools[pool]
        if pool_k.shape[1:] != (key.shape[1], key.shape[3]) or pool_v.shape[1:] != (value.shape[1], value.shape[3]):
            raise UnsupportedModelError(
                f"layer {layer_idx}'s keys/values changed shape between steps ({tuple(pool_k.shape[1:])} cached, "
                f"{(key.shape[1], key.shape[3])} new); prepack's engine cannot decode this model exactly"
            )
        pool_k.index_copy_(0, self.dst, key[0].transpose(0, 1))
        pool_v.index_copy_(0, self.dst, value[0].transpose(0, 1))
        store._note_peak()
        return pool_k[: self.end].transpose(0, 1)[None], pool_v[: self.end].transpose(0, 1)[None]

    def _read_shared(self, layer_idx: int, key, value, window) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool of the layer ``layer_idx`` reads (KV sharing): its entries, not a copy.

        The model hands a reading layer the very key and value tensors its source layer computed this step
        (transformers' ``shared_kv_states``); anything else would be keys the source's pool does not hold.
        """
        source = self.store.reads[layer_idx]
        new = self._new.get(source)
        if new is None or new[0] is not key or new[1] is not value:
            raise UnsupportedModelError(
                f"layer {layer_idx} should read layer {source}'s keys and values (the config's KV sharing), but its "
                "attention got other tensors; prepack's engine cannot decode this model exactly"
            )
        slides = self.store.slides
        if source < len(slides) and slides[source] and not window:
            raise UnsupportedModelError(
                f"layer {layer_idx} reads layer {source}'s keys, which transformers' own cache keeps only within a "
                "sliding window, but its attention applies no window; prepack's decode engine cannot reproduce that exactly"
            )
        pool_k, pool_v = self.store.pools[source]
        return pool_k[: self.end].transpose(0, 1)[None], pool_v[: self.end].transpose(0, 1)[None]
