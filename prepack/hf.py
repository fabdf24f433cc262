"""How packed attention reaches a Hugging Face model: by registration, never by patching.

Importing prepack registers an attention function and a mask function named
``"prepack"`` with transformers' ``AttentionInterface`` /
``AttentionMaskInterface``. A model switched to it computes, in each layer:

* **varlen attention** when the call carries a packed layout: the
  ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``
  kwargs (the names of transformers' flash-attention path and
  ``DataCollatorWithFlattening``), or restarting ``position_ids`` with no cache
  and no mask. The backend comes from the ``prepack_backend`` kwarg (default ``"auto"``).
* **the model's own attention** otherwise (decoding, padded batches), with the
  model's own mask: the implementation the model had before prepack switched
  it (``sdpa``, a flash kernel, ...), or explicit math where that would drop a
  feature (soft-capping, or an ``eager`` model).

Masks: the ``"prepack"`` mask function returns None, and builds nothing, for a
call with no padding mask, no cache and no custom mask overlay: attention then
knows everything from ``position_ids`` and the layout kwargs, so a packed
forward never materialises a (T, T) mask. Otherwise it is the model's own mask.

Thread safety: :func:`packed_forward` switches a model to ``"prepack"`` under a
lock and counts the callers inside; the last one to leave restores the model's
own implementation. While switched, every call that carries no packed layout
takes the path above, so a concurrent caller of the same model (packed or not)
gets the same result as without prepack. Nothing else is stored on the model:
each packed call carries its layout and its KV sink through its own kwargs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch

import numpy as np

from . import layout
from .attention import SINK_BACKENDS, dense_attention, get_backend, resolve_backend, segment_mask
from .kvcache import own_storage
from .support import PREPACK_KWARGS, UnsupportedModelError, check_model, layer_attention

ATTN_IMPLEMENTATION = "prepack"

_LOCK = threading.Lock()
_SWITCHED: dict[int, list] = {}  # id(model) -> [callers inside, {id(config): (config, its own implementation)}]
_FALLBACK: dict[int, str] = {}  # id(config) -> the implementation it had before the switch, while switched


def cu_seqlens_from_position_ids(position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """The sequences a maskless (B, L) call holds -> (n + 1,) int32 cu_seqlens over its B * L tokens.

    A sequence starts at each row start and wherever the position ids do not step by one, as in
    transformers' ``find_packed_sequence_indices`` (so restarting position ids, padding-free rows
    and ``DataCollatorWithFlattening`` batches all split where transformers splits them).

    Args:
        position_ids: (B, L) or (1, L) int, or None (every row is one sequence).
    """
    if position_ids is None:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    pos = position_ids.expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    first = torch.nonzero(starts.reshape(-1)).reshape(-1)
    return torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)


def prepack_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature: query (B, H, Lq, D), key/value (B, H_kv, Lk, D) -> ((B, Lq, H, D_v), None).

    The layer's semantics (window, chunk, soft-cap, sinks) come from :func:`prepack.support.layer_attention`,
    which raises for anything prepack does not implement.
    """
    B, H, Lq, D = query.shape
    sem = layer_attention(module, kwargs, B * Lq)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    captured = kwargs.get("prepack_kv")
    if captured is not None:  # prefill keeps each layer's keys and values for the per-request caches
        captured.append((own_storage(key), own_storage(value)))
    row_mask = kwargs.get("prepack_row_mask")
    if row_mask is not None:  # rows of capacity C under dense block-diagonal masks (the prepacking paper's layout)
        out = dense_attention(
            query, key, value, row_mask(sem.window, sem.chunk), scale=scale, softcap=sem.softcap,
            dropout_p=dropout, sinks=sem.sinks,
        )
        return out.transpose(1, 2), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and attention_mask is None and Lq == key.shape[2]:
        # no mask and no cache: prepack_mask found attention plain (or windowed) causal within each sequence
        cu_q = cu_k = cu_seqlens_from_position_ids(kwargs.get("position_ids"), B, Lq).to(query.device)
    if cu_q is None:
        return _model_attention(module, query, key, value, attention_mask, scale, dropout, sem, **kwargs)
    if attention_mask is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__} got an attention mask together with a packed layout (cu_seq_lens); "
            "prepack cannot honour both: pass packed position_ids / cu_seq_lens without an attention_mask"
        )
    cu_k = cu_q if cu_k is None else cu_k
    prefix = kwargs.get("prepack_prefix")
    if prefix is not None:  # the queries continue earlier tokens (a shared context): their keys go in front
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} has no layer_idx, so prepack cannot find its layer's shared-context keys"
            )
        key, value = prefix.extend(layer_idx, key, value)
    max_q, max_k = kwargs.get("max_length_q") or Lq, kwargs.get("max_length_k") or key.shape[2]
    if sem.chunk is not None:
        cu_q, cu_k, max_q, max_k = _chunked_layout(module, cu_q, cu_k, sem.chunk)
    requested = kwargs.get("prepack_backend", "auto")
    if sem.sinks is not None and requested == "auto":
        requested = "sdpa_varlen"  # the CUDA kernels take no sinks; SDPA per segment does, on any device
    kernel_args = dict(device=query.device, dtype=query.dtype, head_dim=max(D, value.shape[3]), softcap=sem.softcap)
    name = resolve_backend(requested, **kernel_args)
    if sem.sinks is not None and name not in SINK_BACKENDS:
        raise UnsupportedModelError(
            f"{type(module).__name__} has attention sinks, which backend {name!r} does not implement; "
            f"use one of {', '.join(SINK_BACKENDS)}"
        )
    fn = get_backend(name, **kernel_args)
    q = query.transpose(1, 2).reshape(B * Lq, H, D)
    k = key.transpose(1, 2).reshape(-1, key.shape[1], D)
    v = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[3])
    extra = {} if sem.sinks is None else {"sinks": sem.sinks}
    out = fn(
        q, k, v, cu_q.to(query.device), cu_k.to(query.device), max_q, max_k,
        dropout_p=dropout, softmax_scale=scale, causal=True,
        window_size=(sem.window - 1, 0) if sem.window else (-1, -1), softcap=sem.softcap, **extra,
    )
    return out.view(B, Lq, H, value.shape[3]), None


def _chunked_layout(module, cu_q: torch.Tensor, cu_k: torch.Tensor, chunk: int):
    """A packed layout with each sequence cut at multiples of ``chunk`` tokens: chunked local attention.

    Positions restart per sequence, so the cuts fall where transformers' chunked mask puts chunk
    boundaries for each sequence alone. Only a layout whose queries are its keys (no cache) can be cut.
    """
    if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
        raise UnsupportedModelError(
            f"{type(module).__name__} uses chunked attention, which prepack implements only when queries are "
            "the keys (a prefill with no cache)"
        )
    cu = cu_q.cpu().numpy()
    pieces = layout.chunked(np.diff(cu), chunk)
    cu = torch.from_numpy(layout.cu_seqlens(pieces)).to(cu_q.device)
    longest = int(pieces.max()) if len(pieces) else 0
    return cu, cu, longest, longest


def _model_attention(module, query, key, value, attention_mask, scale, dropout, sem, **kwargs):
    """No packed layout in this call (decoding, a padded batch): the model's own attention under its own mask."""
    for name in PREPACK_KWARGS:
        kwargs.pop(name, None)
    fallback = _fallback_implementation(module.config)
    if sem.softcap or sem.sinks is not None or fallback is None:
        # SDPA cannot soft-cap logits or take sinks, and an eager model's function is private to its
        # modeling file: the same attention, written out (bool mask, or an additive one with 0 where allowed)
        if attention_mask is None:  # transformers skipped a plain causal mask
            mask = segment_mask(query.shape[2], key.shape[2], (-1, 0), query.device)
        else:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        out = dense_attention(
            query, key, value, mask, scale=scale, softcap=sem.softcap, dropout_p=dropout, sinks=sem.sinks
        )
        return out.transpose(1, 2), None
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping[fallback](
        module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs
    )


def _fallback_implementation(config) -> str | None:
    """The implementation ``config`` had before prepack switched it, if transformers registers it globally.

    None for ``eager`` (each model has its own eager function). A model switched to ``"prepack"`` by the
    user, not by prepack, falls back to ``sdpa``.
    """
    from transformers import AttentionInterface

    name = _FALLBACK.get(id(config), "sdpa")
    return name if name in AttentionInterface._global_mapping and name != ATTN_IMPLEMENTATION else None


def prepack_mask(*args, config=None, **kwargs):
    """The mask for ``"prepack"`` attention: None where attention needs none, else the model's own mask.

    With no padding mask, no cache and no custom overlay, a layer's attention is plain causal (or
    sliding-window, from the ``sliding_window`` kwarg) within each sequence that ``position_ids`` or
    the packed layout kwargs delimit, and :func:`prepack_attention` computes it from those: no mask
    is built, so a packed stream of T tokens never costs a (T, T) mask.
    """
    if (
        kwargs.get("attention_mask") is None
        and not kwargs.get("use_vmap")
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
    ):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fallback = _fallback_implementation(config) or "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[fallback](*args, config=config, **kwargs)


def register() -> None:
    """Register prepack's attention and mask functions with transformers. Idempotent; runs on import."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prepack_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prepack_mask)


@contextlib.contextmanager
def packed_forward(model):
    """Run ``model`` with prepack's attention for the duration of the block; safe across threads.

    The first caller switches the model to ``"prepack"``, the last one out restores each of its
    configs' own implementation, also when the body or the switch itself raises.
    """
    check_model(model)
    _enter(model)
    try:
        yield
    finally:
        _leave(model)


def _configs(model) -> list:
    """Every config object of ``model`` whose ``_attn_implementation`` a switch may change."""
    seen, out = set(), []
    stack = [model.config] + [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        stack.extend(s for key in getattr(c, "sub_configs", {}) if (s := getattr(c, key, None)) is not None)
    return out


def _enter(model) -> None:
    with _LOCK:
        state = _SWITCHED.get(id(model))
        if state is None:
            own = {id(c): (c, c._attn_implementation_internal) for c in _configs(model)}
            if model.config._attn_implementation != ATTN_IMPLEMENTATION:
                _FALLBACK.update({key: impl for key, (c, impl) in own.items()})
                try:
                    model.set_attn_implementation(ATTN_IMPLEMENTATION)
                except BaseException:
                    _restore(own)
                    raise
            else:
                own = {}  # the user chose "prepack": nothing of ours to undo
            state = _SWITCHED[id(model)] = [0, own]
        state[0] += 1


def _leave(model) -> None:
    with _LOCK:
        state = _SWITCHED[id(model)]
        state[0] -= 1
        if state[0] == 0:
            del _SWITCHED[id(model)]
            _restore(state[1])


def _restore(own: dict) -> None:
    for key, (config, impl) in own.items():
        config._attn_implementation_internal = impl
        _FALLBACK.pop(key, None)


def attention_needs(model) -> dict:
    """What ``model``'s attention layers ask of a kernel, for choosing one before the first forward.

    Returns:
        ``{"head_dim": int | None, "softcap": float}``: the widest head dim the config names (``head_dim``,
        ``qk_head_dim``, ``v_head_dim``, ``global_head_dim``, ..., else hidden_size / num_attention_heads), and
        the attention logit soft-capping (0.0 for none).
    """
    config = model.config.get_text_config(decoder=True)
    dims = [d for key, d in vars(config).items() if key.endswith("head_dim") and isinstance(d, int) and d > 0]
    if not dims and getattr(config, "hidden_size", None) and getattr(config, "num_attention_heads", None):
        dims = [config.hidden_size // config.num_attention_heads]
    return {"head_dim": max(dims) if dims else None, "softcap": float(getattr(config, "attn_logit_softcapping", None) or 0.0)}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The name ``model.forward`` / ``generate`` take a cache under: transformers 5.x renamed
    ``past_key_values`` to ``cache``; use whichever this model takes."""
    return _cache_kwarg_for(type(model))
