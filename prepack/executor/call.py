"""What one packed forward carries to every attention layer: its layout, its kernel, its KV source.

A packed call passes one keyword, ``prepack=PackedCall(...)``, down through the model
(the way transformers passes ``cu_seq_lens_q`` and friends as attention kwargs). The call is
frozen and every layer only reads it: the layout is built once per forward, on the host and then
once on the device, and the kernel was chosen once for the call (:func:`prepack.attention.registry.choose`).
Keys and values go where the call's :class:`KVSource` puts them (the step's view of the executor's KV
store); nothing is written to the call, the model or its config.

A segment's queries may continue keys computed earlier (a shared context, an earlier chunk
of a long prompt): then its key length exceeds its query length, and the kernel aligns the
causal mask to the bottom right, as flash-attn does.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..planner import layout
from ..attention.registry import Kernel
from ..hf.support import UnsupportedModelError
from ..mixers import MixerStates


@dataclass(frozen=True, eq=False)
class StepLayout:
    """The segments of one packed forward, on the host and on the device.

    Attributes:
        q_lengths: (n,) int64 numpy, the new tokens (queries) of each segment.
        k_lengths: (n,) int64 numpy, the keys each segment attends to (``>= q_lengths``;
            equal unless the segment continues earlier keys).
        device: where the model runs.
    """

    q_lengths: np.ndarray
    k_lengths: np.ndarray
    device: torch.device

    @functools.cached_property
    def cu_seqlens_q(self) -> torch.Tensor:
        """(n + 1,) int32 on the device."""
        return torch.from_numpy(layout.cu_seqlens(self.q_lengths)).to(self.device)

    @functools.cached_property
    def cu_seqlens_k(self) -> torch.Tensor:
        """(n + 1,) int32 on the device (the same tensor as ``cu_seqlens_q`` when queries are the keys)."""
        if self.queries_are_keys:
            return self.cu_seqlens_q
        return torch.from_numpy(layout.cu_seqlens(self.k_lengths)).to(self.device)

    @functools.cached_property
    def queries_are_keys(self) -> bool:
        return bool(np.array_equal(self.q_lengths, self.k_lengths))

    @property
    def max_seqlen_q(self) -> int:
        return int(self.q_lengths.max()) if len(self.q_lengths) else 0

    @property
    def max_seqlen_k(self) -> int:
        return int(self.k_lengths.max()) if len(self.k_lengths) else 0

    def varlen_args(self, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for the kernel.

        ``chunk``: chunked local attention (Llama 4's ``attention_chunk_size``): each segment cut at
        multiples of ``chunk`` tokens, a piece being a segment of its own. Positions restart per
        request, so the cuts fall where transformers' chunked mask puts them for each request alone.
        Built once per chunk size per forward, from the host lengths (no device sync per layer).
        """
        if chunk is None:
            return self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k
        if chunk not in self._chunked:
            self._chunked[chunk] = self._cut(chunk)
        return self._chunked[chunk]

    @functools.cached_property
    def _chunked(self) -> dict:
        return {}

    def _cut(self, chunk: int):
        q, k = _chunk_pieces(self.q_lengths, self.k_lengths, chunk)
        cu_q = torch.from_numpy(layout.cu_seqlens(q)).to(self.device)
        cu_k = cu_q if np.array_equal(q, k) else torch.from_numpy(layout.cu_seqlens(k)).to(self.device)
        return cu_q, cu_k, int(q.max()) if len(q) else 0, int(k.max()) if len(k) else 0


def _chunk_pieces(q_lengths: np.ndarray, k_lengths: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Segments cut for chunked attention: (m,) query and (m,) key lengths of the pieces, back to back.

    A segment's keys are its request's positions 0..k-1 and its queries the last q of them. A query at
    position p sees the keys of its own chunk, ``chunk * (p // chunk)`` up to p: each chunk the queries
    touch becomes a piece (its queries, the chunk's keys up to the last query, bottom-right aligned), and
    the keys before the first such chunk become a piece with no queries. With q == k this is
    :func:`prepack.planner.layout.chunked`::

        _chunk_pieces([2], [7], 3) -> q [0, 1, 1], k [3, 3, 1]   # queries at 5 and 6
    """
    qs, ks = [], []
    for q, k in zip(q_lengths.tolist(), k_lengths.tolist(), strict=True):
        if q == 0:
            qs.append(0)
            ks.append(k)
            continue
        first = (k - q) // chunk * chunk  # start of the chunk of the first query
        if first:
            qs.append(0)
            ks.append(first)
        for start in range(first, k, chunk):
            end = min(start + chunk, k)
            qs.append(end - max(start, k - q))
            ks.append(end - start)
    return np.asarray(qs, np.int64), np.asarray(ks, np.int64)


class KVSource(Protocol):
    """Where a packed call's attention layers hand their new keys and values, and what they attend to instead.

    ``extend(layer_idx, key, value, window)``: ``key``/``value`` (1, H_kv, T, D) are the call's new tokens'
    keys and values at layer ``layer_idx`` (None for a module without one), ``window`` the sliding window
    or chunk that layer's attention applies (None: none). Returns (1, H_kv, S, D) keys and values in the
    call's key layout (:attr:`StepLayout.k_lengths`): the new ones with whatever earlier keys each segment
    continues. Implementation: the executor's store, :class:`prepack.executor.kvstore.StepKV`.
    """

    def extend(self, layer_idx: int | None, key: torch.Tensor, value: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True, eq=False)
class PackedCall:
    """The ``prepack=`` keyword of one packed forward: everything its attention layers read.

    Attributes:
        layout: the forward's segments (:class:`StepLayout`).
        kernel: the attention kernel chosen for the whole call.
        kv: where each layer's new keys and values go and which keys it attends to (:class:`KVSource`), or
            None: each segment attends to its own new keys only.
        row_mask: for a row backend (``sdpa_masked``): ``row_mask(window, chunk)`` -> the rows' dense
            (R, 1, C, C) bool masks.
        states: for models with mixers outside attention (:mod:`prepack.mixers`): each segment's state holder
            (:class:`prepack.mixers.MixerStates`), or None: every segment starts from zero state and its
            final state is not kept (a segment that continues earlier tokens is then refused).
    """

    layout: StepLayout
    kernel: Kernel
    kv: KVSource | None = None
    row_mask: Callable | None = field(default=None)
    states: MixerStates | None = None


# A packed forward's position_ids tensor -> its call, while the forward runs (:func:`carried_by`).
_BY_POSITIONS = WeakIdKeyDictionary()
_BY_POSITIONS_LOCK = threading.Lock()


@contextlib.contextmanager
def carried_by(call: PackedCall, position_ids: torch.Tensor) -> Iterator[None]:
    """Let attention layers find ``call`` by the ``position_ids`` tensor the forward is given, while it runs.

    Some decoder layers (Nemotron's, Falcon's, StableLM's) hand their attention the ``position_ids`` they were
    given but drop every other keyword, ``prepack=`` among them. transformers hands every layer the very same
    position_ids object, so the layer finds the call by that object's identity (:func:`call_of`), as a padding-free
    training batch's layout is found (:mod:`prepack.hf.registration`). Nothing is written to the model; the entry
    goes when the forward returns (or the tensor does), and another forward's tensor is another object.
    """
    with _BY_POSITIONS_LOCK:
        _BY_POSITIONS[position_ids] = call
    try:
        yield
    finally:
        with _BY_POSITIONS_LOCK:
            _BY_POSITIONS.pop(position_ids, None)


def call_of(position_ids) -> PackedCall | None:
    """The packed call whose forward was given this very ``position_ids`` tensor (:func:`carried_by`), else None."""
    if not isinstance(position_ids, torch.Tensor):
        return None
    with _BY_POSITIONS_LOCK:
        return _BY_POSITIONS.get(position_ids)


def check_layer_idx(layer_idx: int | None) -> None:
    """Refuse a module without ``layer_idx``: its earlier keys cannot be found."""
    if layer_idx is None:
        raise UnsupportedModelError("an attention module has no layer_idx, so prepack cannot find its layer's earlier keys")
