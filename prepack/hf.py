"""How packed attention reaches a Hugging Face model: by registration, never by patching.

Importing prepack registers an attention function named ``"prepack"`` with
transformers' ``AttentionInterface``. A model switched to it
(``model.set_attn_implementation("prepack")``) computes varlen attention, with
the backend named by the ``prepack_backend`` kwarg (default ``"auto"``),
whenever the call carries a packed layout:

* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``
  kwargs, the names transformers' own flash-attention path and
  ``DataCollatorWithFlattening`` use, or
* restarting ``position_ids`` in a single row with no cache prefix;

and ordinary attention (transformers' SDPA, with its mask) otherwise, so the
same model still decodes.
"""

from __future__ import annotations

import contextlib
import contextvars
import torch

from .attention import _dense_allowed, dense_attention, get_backend

ATTN_IMPLEMENTATION = "prepack"

# True while prepack runs a packed forward: the mask builders then return None,
# because the packed layout, not a dense mask, tells attention what to see.
_PACKED_FORWARD = contextvars.ContextVar("prepack_packed_forward", default=False)


def _cu_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, T) restarting position ids -> (n + 1,) int32 cu_seqlens."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    if len(starts) == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)


def _is_packed(position_ids: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    if position_ids is None or position_ids.shape[0] != 1 or q_len != k_len or q_len < 2:
        return False
    return bool((position_ids[0, 1:] == 0).any())


def prepack_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature: query (B, H, Lq, D), key/value (B, H_kv, Lk, D) -> ((B, Lq, H, D), None)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap") or 0.0
    captured = kwargs.get("prepack_kv")
    if captured is not None:  # prefill keeps each layer's keys and values for the per-request caches
        captured.append((key, value))
    mask_fn = kwargs.get("prepack_mask_fn")
    if mask_fn is not None:  # masked prefill: rows of capacity C with a dense block-diagonal mask
        out = dense_attention(query, key, value, mask_fn(window), scale=scale, softcap=softcap, dropout_p=dropout)
        return out.transpose(1, 2), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and _is_packed(kwargs.get("position_ids"), query.shape[2], key.shape[2]):
        cu_q = cu_k = _cu_from_position_ids(kwargs["position_ids"])
    if cu_q is None:
        return _unpacked_attention(module, query, key, value, attention_mask, scale, dropout, softcap, **kwargs)
    cu_k = cu_q if cu_k is None else cu_k
    B, H, Lq, D = query.shape
    fn = get_backend(kwargs.get("prepack_backend", "auto"), device=query.device, dtype=query.dtype)
    q = query.transpose(1, 2).reshape(B * Lq, H, D)
    k = key.transpose(1, 2).reshape(-1, key.shape[1], D)
    v = value.transpose(1, 2).reshape(-1, value.shape[1], D)
    out = fn(
        q, k, v, cu_q.to(query.device), cu_k.to(query.device),
        kwargs.get("max_length_q") or Lq, kwargs.get("max_length_k") or key.shape[2],
        dropout_p=dropout, softmax_scale=scale, causal=True,
        window_size=(window - 1, 0) if window else (-1, -1), softcap=softcap,
    )
    return out.view(B, Lq, H, D), None


def _unpacked_attention(module, query, key, value, attention_mask, scale, dropout, softcap, **kwargs):
    """No packed layout in this call (e.g. decoding): ordinary attention under transformers' mask."""
    if softcap:  # SDPA cannot soft-cap logits: do it explicitly
        if attention_mask is None:
            mask = _dense_allowed(query.shape[2], key.shape[2], True, (-1, -1), query.device)
        else:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        out = dense_attention(query, key, value, mask, scale=scale, softcap=softcap, dropout_p=dropout)
        return out.transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for name in ("prepack_backend", "prepack_kv"):
        kwargs.pop(name, None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs)


def prepack_mask(*args, **kwargs):
    """transformers' SDPA mask, or None inside a packed forward, where the packed layout says what each token sees."""
    if _PACKED_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register prepack's attention (and mask) functions with transformers. Idempotent; runs on import."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prepack_attention)
    # Outside a packed forward the fallback is SDPA, so it gets SDPA's mask.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prepack_mask)


@contextlib.contextmanager
def packed_forward(model):
    """Run ``model`` with prepack's attention, restoring its own implementation afterwards."""
    check_model(model)
    previous = model.config._attn_implementation
    token = _PACKED_FORWARD.set(True)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _PACKED_FORWARD.reset(token)


def check_model(model) -> None:
    """Raise a clear error for models prepack cannot pack exactly."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise TypeError(f"{name} is not a transformers PreTrainedModel (it has no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{name} is an encoder-decoder model; prepack packs decoder-only prompts")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(
            f"{name} does not route attention through transformers' AttentionInterface, so prepack "
            "cannot give it packed attention; use a decoder-only model that supports attn_implementation"
        )
