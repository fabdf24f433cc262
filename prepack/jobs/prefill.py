"""Step 5 of the data flow: a packed prefill and each request's own keys and values.

``prefill`` runs the prompts through the executor (:mod:`prepack.jobs`)
and keeps what each request needs: its last-token logits and its own keys and
values. The packed forward gets a recording cache (:func:`prepack.jobs.caches.recording_cache`)
that keeps what the model writes to its cache, layer by layer, and stores nothing:
a transformers cache would copy the whole stream once more, and a sliding-window
cache would drop tokens of the stream that other requests still need. Recording
at the cache, not in attention, keeps exactly what the model caches, also where
that is not what attention sees (MLA caches compressed latents). They are gathered
into per-request layouts only on demand.

Requests that share a prefix (a system prompt) run it once, and a prompt longer than
``token_budget`` runs in chunks over several steps: a request's keys and values then sit in
several pieces (its prefix regions', then its own), and every cache layout below gathers them from there.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import caches as kvcache
from ..planner import layout
from ..hf.registration import model_device
from ..hf.inputs import check_prompts
from .run import JobsRun, run_jobs
from ..data.batch import PackedBatch, pack_plan
from ..planner.bins import Plan
from ..mixers.states import MixerCapture, SegmentCaches, with_keys
from ..hf.support import UnsupportedModelError


@dataclass(frozen=True, eq=False)
class PrefillResult:
    """What a packed prefill leaves for each of N requests.

    The keys and values stay where the forwards left them, one chunk per forward, so that
    holding them costs their size once (a shared prefix's too, however many requests continue
    it); the cache layouts below gather from them on demand.

    Attributes:
        logits: (N, V) last-token logits, in request order (None when not asked for).
        lengths: (N,) int64 tokens per request, on the model's device.
        steps: the forwards that ran.
        backend: the attention backend that ran (``"auto"`` resolved).
        chunks: per forward, per layer (keys, values), each (B, H_kv, L, D): what the model cached
            (RoPE applied; compressed latents for MLA).
        parts: where each request's tokens sit in ``chunks`` (:class:`~prepack.planner.layout.Parts`): one
            piece for a request run whole; its shared prefix's pieces, then its own, otherwise.
        config: the model config, for building caches with the right layer types.
        tokens_run: tokens that went through the model.
        shared_tokens: prompt tokens not run because their shared prefix ran once
            (``lengths.sum() == tokens_run + shared_tokens``).
    """

    logits: torch.Tensor | None
    lengths: torch.Tensor
    steps: int
    backend: str
    chunks: list
    parts: layout.Parts
    config: object
    tokens_run: int = 0
    shared_tokens: int = 0
    _last_pieces: tuple | None = None  # (Plan, tokens) of each request's last piece, for the deprecated ``batch``
    layer_copies: dict = field(default_factory=dict)  # cache layers the model appends -> the layer each copies

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @property
    def batch(self) -> PackedBatch:
        """Deprecated: the :class:`~prepack.data.batch.PackedBatch` of each request's own last piece as it ran (row: the
        step's row, offset: where it started; positions restart per piece). Read :attr:`steps` and :attr:`parts`."""
        warnings.warn(
            "PrefillResult.batch is deprecated: prefill runs as steps of one executor and a request's tokens may sit in "
            "several pieces (its shared prefix's, its chunks); read PrefillResult.steps and PrefillResult.parts",
            DeprecationWarning, stacklevel=2,
        )
        the_plan, tokens = self._last_pieces
        return pack_plan(the_plan, tokens)

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        return self.lengths.cpu().numpy()

    def request_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of request ``i``, each (1, H_kv, lengths[i], D).

        Views, no copy, for a request whose tokens are one piece; its pieces concatenated otherwise.
        """
        pieces = self.parts.select([i])
        per_piece = []
        for c, start, n in zip(pieces.chunk.tolist(), pieces.starts.tolist(), pieces.sizes.tolist()):
            layers = self.chunks[c]
            keyed = next((kv for kv in layers if kv is not None), None)
            if keyed is None:  # a model of mixers only (Mamba2): no layer caches keys
                per_piece.append([None] * len(layers))
                continue
            b, l = divmod(start, keyed[0].shape[2])
            # a mixer layer (prepack.mixers) caches no keys: None, its states are in the request's mixer cache
            per_piece.append([None if kv is None else (kv[0][b : b + 1, :, l : l + n], kv[1][b : b + 1, :, l : l + n]) for kv in layers])
        if len(per_piece) == 1:
            return per_piece[0]
        if not per_piece:  # an empty prompt: zero-length views of the first chunk's layers
            layers = self.chunks[0] if self.chunks else []
            return [None if kv is None else (kv[0][:1, :, :0], kv[1][:1, :, :0]) for kv in layers]
        return [tuple(torch.cat(xs, dim=2) for xs in zip(*layer)) for layer in zip(*per_piece)]

    def _mixer_states(self, i: int):
        """Request ``i``'s cache of the model's own class holding its mixer layers' final states (prepack.mixers),
        or None for a model without mixers. Each request of such a model runs whole, as one piece."""
        if not self.chunks or not isinstance(self.chunks[0], MixerCapture):
            return None
        pieces = self.parts.select([i])
        if len(pieces.chunk) == 0:  # an empty prompt: a fresh cache, as the model alone starts from
            return SegmentCaches(self.config).cache_for(0)
        return self.chunks[int(pieces.chunk[0])].states[int(pieces.starts[0])]

    def _refuse_mixers(self, what: str) -> None:
        if self.chunks and isinstance(self.chunks[0], MixerCapture):
            raise UnsupportedModelError(
                f"{what} holds padded keys and values only, and this model's convolution / recurrent layers keep "
                "per-request states besides them; use .dynamic_caches (the model's own cache class per request)"
            )

    @functools.cached_property
    def dynamic_caches(self) -> list:
        """One transformers ``DynamicCache`` per request, holding a copy of exactly its prompt's keys and values."""
        if self.chunks and isinstance(self.chunks[0], MixerCapture):  # mixer states + attention keys, one cache
            return [with_keys(self._mixer_states(i), self.request_kv(i)) for i in range(self.num_requests)]
        return [kvcache.build_dynamic_cache(self.config, self.request_kv(i), self.layer_copies) for i in range(self.num_requests)]

    def _pieces(self, rows: np.ndarray, dst: np.ndarray) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per chunk: (chunk, src, dst) token indices moving ``rows``' tokens to ``dst`` (request after request)."""
        parts = self.parts.select(rows)
        return kvcache.chunk_pieces(parts.chunk, parts.starts, parts.sizes, dst, self.lengths.device)

    def left_padded_cache(self, pad_to: int | None = None, *, rows: Sequence[int] | np.ndarray | None = None):
        """One batched ``DynamicCache`` for ``model.generate``, left-padded to the longest prompt.

        Args:
            pad_to: cache length (default: the longest prompt).
            rows: (M,) the request each cache row holds (default: every request once, in
                order). Repeats give several rows the same prompt, e.g. for several samples
                per prompt, without prefilling it twice or copying a cache.

        Returns:
            ``(cache, attention_mask)``: a ``DynamicCache`` whose layers are
            (M, H_kv, pad_to, D), and an (M, pad_to) int64 mask, 1 on real tokens.
        """
        self._refuse_mixers("left_padded_cache()")
        pad_to = self._pad_to(pad_to)
        rows = np.arange(self.num_requests) if rows is None else np.asarray(rows, np.int64)
        dst = kvcache.padded_targets(self._lengths[rows], pad_to, left=True)
        mask = torch.zeros(len(rows), pad_to, dtype=torch.long, device=self.lengths.device)
        mask.view(-1)[torch.from_numpy(dst).to(mask.device)] = 1
        cache = kvcache.left_padded_cache(self.config, self.chunks, self._pieces(rows, dst), len(rows), pad_to, self.layer_copies)
        return cache, mask

    def flash_kvcache(self, extra: int = 0, *, padding: str = "right") -> kvcache.FlashKVCache:
        """Caches in ``flash_attn_with_kvcache`` layout, with room for ``extra`` decoded tokens.

        Args:
            extra: free slots after the longest prompt, for the tokens to decode.
            padding: ``"right"`` (prompts start at 0, ``cache_seqlens`` = lengths) or
                ``"left"`` (prompts end together; pass ``cache_leftpad``, flash-attn >= 2.6.1).

        Returns:
            A :class:`~prepack.jobs.caches.FlashKVCache`: per layer (N, longest + extra, H_kv, D)
            keys and values, ``cache_seqlens`` (N,) int32 and, for ``"left"``, ``cache_leftpad`` (N,) int32.
        """
        self._refuse_mixers("flash_kvcache()")
        if padding not in ("right", "left"):
            raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
        if not isinstance(extra, int) or extra < 0:
            raise ValueError(f"extra must be an integer >= 0, got {extra!r}")
        n, longest = self.num_requests, self._pad_to(None)
        left = padding == "left"
        dst = kvcache.padded_targets(self._lengths, longest, left=left, row_len=longest + extra)
        pieces = self._pieces(np.arange(n), dst)
        num_layers = len(self.chunks[0]) if self.chunks else 0
        ks = [kvcache.gather_padded([c[j][0] for c in self.chunks], pieces, n, longest + extra) for j in range(num_layers)]
        vs = [kvcache.gather_padded([c[j][1] for c in self.chunks], pieces, n, longest + extra) for j in range(num_layers)]
        lengths = self.lengths.to(torch.int32)
        if left:
            return kvcache.FlashKVCache(ks, vs, torch.full_like(lengths, longest), longest - lengths)
        return kvcache.FlashKVCache(ks, vs, lengths, None)

    def _pad_to(self, pad_to: int | None) -> int:
        longest = int(self._lengths.max()) if self.num_requests else 0
        if pad_to is None:
            return longest
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
        return pad_to


def prefill(
    model,
    sequences: Sequence,
    *,
    backend: str = "auto",
    token_budget: int | None = None,
    capacity: int | None = None,
    logits: bool = True,
    tokenizer=None,
    processor=None,
    share_prefixes: bool = True,
) -> PrefillResult:
    """Run many prompts through ``model`` in one packed prefill.

    Args:
        model: a decoder-only transformers model whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Mistral, Gemma, ...).
        sequences: N prompts: token-id lists or 1-D tensors, tokenizer output
            (``input_ids`` + ``attention_mask``, left- or right-padded), strings or chat
            conversations with ``tokenizer`` (see :mod:`prepack.hf.inputs`).
        backend: ``"auto"``, ``"flash"``, ``"torch_varlen"``, ``"sdpa_varlen"``, ``"flex"``, ``"sdpa_masked"``
            or ``"reference"``. ``"auto"`` on CUDA in fp16/bf16 is flash-attn if it imports, else PyTorch's
            FlashAttention varlen kernel (``"torch_varlen"``), else ``"sdpa_varlen"``; the choice is
            ``PrefillResult.backend``.
        token_budget: at most this many tokens per forward pass; default
            :func:`default_token_budget` (raised to the longest prompt if that is longer). A
            prompt longer than an explicit ``token_budget`` is prefilled in chunks of at most
            ``token_budget`` tokens, each continuing the keys of the ones before (varlen backends).
        capacity: row length for ``backend="sdpa_masked"`` (default: the longest prompt);
            refused for the other backends, which take no rows.
        logits: compute the last-token logits.
        tokenizer: tokenizes string or chat prompts.
        processor: a vision-language model's processor, for chats with images (see :mod:`prepack.hf.vision`).
        share_prefixes: prompts that start with the same tokens (a system prompt) run them once
            (:mod:`prepack.executor.regions` decides which; varlen backends, and not for models where a
            merged prefix is not exact: length-dependent RoPE, sliding windows, soft-capping, sinks; nor prompts with images); ``False`` runs every prompt whole. The
            results are the same.

    Returns:
        A :class:`PrefillResult`: ``.logits`` (N, V), ``.dynamic_caches``,
        ``.left_padded_cache()``, ``.flash_kvcache()``.
    """
    prompts = check_prompts(model, sequences, tokenizer=tokenizer, processor=processor)
    return prefill_tokens(
        model, prompts.tokens, backend=backend, token_budget=token_budget, capacity=capacity, logits=logits,
        share_prefixes=share_prefixes, vision=prompts.vision,
    )


def prefill_tokens(
    model, tokens: Sequence[np.ndarray], *, backend: str, token_budget: int | None, capacity: int | None, logits: bool,
    share_prefixes: bool = True, vision=None,
) -> PrefillResult:
    """:func:`prefill` on prompts :func:`check_prompts` accepted; zero-length ones get an empty cache and no logits."""
    lengths = layout.lengths_of(tokens)
    # last-token logits: a one-token span per prompt (none for an empty prompt)
    spans = np.stack([np.maximum(lengths - 1, 0), lengths], 1) if logits else None
    run = run_jobs(
        model, tokens, backend=backend, token_budget=token_budget, capacity=capacity, spans=spans, keep_cache=True,
        lengths=lengths, share_prefixes=share_prefixes, vision=vision,
    )
    device = model_device(model)
    out_logits = None
    if logits:  # (N, V), N = 0 included
        out_logits = run.values.new_zeros(len(tokens), run.values.shape[-1])
        out_logits[torch.from_numpy(np.flatnonzero(lengths)).to(device)] = run.values
    return PrefillResult(
        logits=out_logits, lengths=torch.from_numpy(lengths).to(device), steps=run.steps, backend=run.backend,
        chunks=run.chunks, parts=run.parts, config=model.config, tokens_run=run.tokens_run,
        shared_tokens=run.shared_tokens, _last_pieces=_last_pieces(run, tokens), layer_copies=run.layer_copies,
    )


def _last_pieces(run: JobsRun, tokens) -> tuple:
    """(Plan, tokens) of each non-empty request's last piece: its row among all steps' rows and its offset there."""
    parts = run.parts
    first = np.searchsorted(parts.owner, np.arange(parts.num_requests + 1))
    has = np.flatnonzero(first[1:] > first[:-1])
    last = first[has + 1] - 1
    widths = np.array([w for _, w in run.grids], np.int64)
    row_base = np.concatenate([[0], np.cumsum([b for b, _ in run.grids])]).astype(np.int64)
    step, start, size = parts.chunk[last], parts.starts[last], parts.sizes[last]
    row = row_base[step] + start // np.maximum(widths[step], 1)
    the_plan = Plan(size, row, start % np.maximum(widths[step], 1), int(widths.max(initial=1)), int(row_base[-1]))
    return the_plan, [np.asarray(tokens[i])[-n:] for i, n in zip(has.tolist(), size.tolist())]
