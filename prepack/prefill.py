"""Step 4 of the data flow: one packed forward pass over many prompts.

``prefill`` plans and packs the prompts, runs the model once per micro-batch
with prepack's attention registered through ``AttentionInterface``, and keeps
what each request needs: its last-token logits and its own keys and values.
The attention function records each layer's (RoPE-applied) keys and values as
it sees them, so the packed forward runs with ``use_cache=False``: a
transformers cache would copy the whole stream once more, and a sliding-window
cache would drop tokens of the stream that other requests still need. They are
gathered into per-request layouts only on demand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import kvcache, layout
from .forward import ROW_BACKENDS, run_packed  # noqa: F401  (ROW_BACKENDS: where it used to live)
from .hf import check_model, model_device
from .packing import PackedBatch, token_array


@dataclass(frozen=True, eq=False)
class PrefillResult:
    """What a packed prefill leaves for each of N requests.

    Attributes:
        logits: (N, V) last-token logits, in request order (None when not asked for).
        lengths: (N,) int64 tokens per request, on the model's device.
        batch: the :class:`~prepack.packing.PackedBatch` that was run.
        backend: the attention backend that ran (``"auto"`` resolved).
        layers: per layer, packed (keys, values), each (B, H_kv, L, D), RoPE applied.
        starts: (N,) int64 numpy, where each request's first token sits in the
            layers' flattened (B * L) token axis.
        config: the model config, for building caches with the right layer types.
    """

    logits: torch.Tensor | None
    lengths: torch.Tensor
    batch: PackedBatch
    backend: str
    layers: list
    starts: np.ndarray
    config: object

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        return self.lengths.cpu().numpy()

    @functools.cached_property
    def _sources(self) -> torch.Tensor:
        """(T,) int64 on the device: the packed token index of every request's tokens, request after request."""
        return torch.from_numpy(layout.ranges(self.starts, self._lengths)).to(self.lengths.device)

    def request_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of request ``i``, each (1, H_kv, lengths[i], D): views, no copy."""
        seq_len = self.layers[0][0].shape[2] if self.layers else 1
        b, l = divmod(int(self.starts[i]), seq_len)
        n = int(self._lengths[i])
        return [(k[b : b + 1, :, l : l + n], v[b : b + 1, :, l : l + n]) for k, v in self.layers]

    @functools.cached_property
    def dynamic_caches(self) -> list:
        """One transformers ``DynamicCache`` per request, holding a copy of exactly its prompt's keys and values."""
        return [kvcache.build_dynamic_cache(self.config, self.request_kv(i)) for i in range(self.num_requests)]

    def left_padded_cache(self, pad_to: int | None = None):
        """One batched ``DynamicCache`` for ``model.generate``, left-padded to the longest prompt.

        Returns:
            ``(cache, attention_mask)``: a ``DynamicCache`` whose layers are
            (N, H_kv, pad_to, D), and an (N, pad_to) int64 mask, 1 on real tokens.
        """
        n, pad_to = self.num_requests, self._pad_to(pad_to)
        dst = torch.from_numpy(kvcache.padded_targets(self._lengths, pad_to, left=True)).to(self.lengths.device)
        mask = torch.zeros(n, pad_to, dtype=torch.long, device=self.lengths.device)
        mask.view(-1)[dst] = 1
        return kvcache.left_padded_cache(self.config, self.layers, self._sources, dst, n, pad_to), mask

    def flash_kvcache(self, extra: int = 0, *, padding: str = "right") -> kvcache.FlashKVCache:
        """Caches in ``flash_attn_with_kvcache`` layout, with room for ``extra`` decoded tokens.

        Args:
            extra: free slots after the longest prompt, for the tokens to decode.
            padding: ``"right"`` (prompts start at 0, ``cache_seqlens`` = lengths) or
                ``"left"`` (prompts end together; pass ``cache_leftpad``, flash-attn >= 2.6.1).

        Returns:
            A :class:`~prepack.kvcache.FlashKVCache`: per layer (N, longest + extra, H_kv, D)
            keys and values, ``cache_seqlens`` (N,) int32 and, for ``"left"``, ``cache_leftpad`` (N,) int32.
        """
        if padding not in ("right", "left"):
            raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
        if not isinstance(extra, int) or extra < 0:
            raise ValueError(f"extra must be an integer >= 0, got {extra!r}")
        n, longest = self.num_requests, self._pad_to(None)
        left = padding == "left"
        dst = kvcache.padded_targets(self._lengths, longest, left=left, row_len=longest + extra)
        dst = torch.from_numpy(dst).to(self.lengths.device)
        ks = [kvcache.gather_padded(k, self._sources, dst, n, longest + extra) for k, _ in self.layers]
        vs = [kvcache.gather_padded(v, self._sources, dst, n, longest + extra) for _, v in self.layers]
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
) -> PrefillResult:
    """Run many prompts through ``model`` in one packed prefill.

    Args:
        model: a decoder-only transformers model whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2, Mistral, Gemma, ...).
        sequences: N prompts, each a list of token ids or a 1-D integer tensor/array.
        backend: ``"auto"``, ``"flash"``, ``"sdpa_varlen"``, ``"flex"``, ``"sdpa_masked"`` or ``"reference"``.
        token_budget: at most this many tokens per forward pass.
        capacity: row length for ``backend="sdpa_masked"`` (default: the longest prompt);
            refused for the other backends, which take no rows.
        logits: compute the last-token logits.

    Returns:
        A :class:`PrefillResult`: ``.logits`` (N, V), ``.dynamic_caches``,
        ``.left_padded_cache()``, ``.flash_kvcache()``.
    """
    tokens = check_prompts(model, sequences)
    return prefill_tokens(model, tokens, backend=backend, token_budget=token_budget, capacity=capacity, logits=logits)


def check_prompts(model, sequences: Sequence, *, allow_empty: bool = False) -> list[np.ndarray]:
    """Validate prompts against ``model``; errors name the request and the limit."""
    check_model(model)
    device = model_device(model)
    config = model.config.get_text_config(decoder=True)
    max_pos = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    tokens = []
    for i, s in enumerate(sequences):
        if isinstance(s, torch.Tensor) and s.device != device:
            raise ValueError(f"request {i} is on {s.device} but the model is on {device}; move it with .to({str(device)!r})")
        if allow_empty and len(s) == 0:
            tokens.append(np.zeros(0, np.int64))
            continue
        t = token_array(s, i)
        if max_pos is not None and len(t) > max_pos:
            raise ValueError(f"request {i} has {len(t)} tokens but the model's max_position_embeddings is {max_pos}")
        if vocab is not None and t.max() >= vocab:
            raise ValueError(f"request {i} has token id {t.max()} but the model's vocab_size is {vocab}")
        tokens.append(t)
    return tokens


def prefill_tokens(
    model, tokens: Sequence[np.ndarray], *, backend: str, token_budget: int | None, capacity: int | None, logits: bool
) -> PrefillResult:
    """:func:`prefill` on prompts :func:`check_prompts` accepted; zero-length ones get an empty cache and no logits."""
    lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    # last-token logits: a one-token span per prompt (none for an empty prompt)
    spans = np.stack([np.maximum(lengths - 1, 0), lengths], 1) if logits else None
    run = run_packed(model, tokens, backend=backend, token_budget=token_budget, capacity=capacity, spans=spans)
    device = model_device(model)
    out_logits = None
    if logits and len(run.values):
        out_logits = run.values.new_zeros(len(tokens), run.values.shape[-1])
        out_logits[torch.from_numpy(np.flatnonzero(lengths)).to(device)] = run.values
    return PrefillResult(
        logits=out_logits, lengths=torch.from_numpy(lengths).to(device), batch=run.batch, backend=run.backend,
        layers=run.layers, starts=run.starts, config=model.config,
    )
