"""How packed attention reaches a Hugging Face model: by registration, never by patching.

prepack registers, with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``,
one implementation per implementation a model may already have: ``"prepack|sdpa"`` wraps
``"sdpa"``, ``"prepack|eager"`` wraps the model's own eager attention, and so on (like
transformers' ``paged|`` prefix). The plain name ``"prepack"`` wraps ``"sdpa"``.

**A switch held only for a call.** Every prepack entry point holds the switch for its own length
(:func:`switched`; a generator such as ``generate_iter`` holds it while it runs, :func:`switched_iter`):
the first holder sets each config of the model to ``"prepack|<its own>"`` through
``model.set_attn_implementation``, the last one to let go sets it back, so after a call returns the model
is as the user left it (``generate_batch``, ``save_pretrained`` and TRL see the user's implementation).
:func:`enable` is the user's own switch: it keeps the model switched, whatever calls come and go, until
:func:`disable`. A model that is already switched when a call starts (``enable``, or a model loaded with
``attn_implementation="prepack|sdpa"``) counts as switched by the user.

**A wrapper changes no one else's call.** A call that carries no packed layout (a plain
forward, ``model.generate``, a padded batch, a second model sharing the config) computes what
the wrapped implementation computes, with the wrapped implementation's own mask. A packed call
carries its layout, its kernel and its KV sink in one keyword, ``prepack=``
(:class:`prepack.executor.call.PackedCall`); a layer whose decoder layer drops that keyword but passes the
forward's ``position_ids`` on finds the call by that tensor (:func:`prepack.executor.call.call_of`), and a causal
call that finds no layout inside a prepack entry point is refused. A padding-free training batch carries transformers'
``cu_seq_lens_q/k`` (``DataCollatorWithFlattening``) or restarting ``position_ids``.

**Masks.** The ``"prepack|<own>"`` mask function builds nothing for a call with no padding mask,
no cache offset and a causal mask (plain, sliding or chunked, or packed ``position_ids``): a packed
stream of T tokens never costs a (T, T) mask. Attention then knows everything from the layout; a
plain call of that kind gets the wrapped implementation's mask, built in the layer. Any other
mask (padding, decoding, bidirectional or custom overlays) is the wrapped implementation's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..attention.functions import dense_attention, segment_mask
from ..attention.registry import Kernel, Needs, choose
from ..executor.call import PackedCall, StepLayout, call_of
from .causal_masks import is_plain_causal
from ..mixers import install as install_mixers
from .wrapped import unwrap
from .support import PREPACK_KWARGS, UnsupportedModelError, check_model, has_attention_sinks, layer_attention, mixes_outside_attention

ATTN_IMPLEMENTATION = "prepack"
PREFIX = "prepack|"
_PLAIN_OWN = "sdpa"  # what the plain name "prepack" wraps

_LOCK = threading.Lock()


def wrapped_implementation(name: str | None) -> str | None:
    """The implementation a prepack implementation name wraps (``"prepack|eager"`` -> ``"eager"``), else None."""
    if name == ATTN_IMPLEMENTATION:
        return _PLAIN_OWN
    if name and name.startswith(PREFIX):
        return name[len(PREFIX):]
    return None


def implementation_for(own: str) -> str:
    """The prepack implementation that wraps ``own``, registered with transformers on first use."""
    name = PREFIX + own
    from transformers import AttentionInterface, AttentionMaskInterface

    if name not in AttentionInterface():
        AttentionInterface.register(name, functools.partial(prepack_attention, own=own))
        AttentionMaskInterface.register(name, functools.partial(prepack_mask, own=own))
    return name


def register() -> None:
    """Register ``"prepack"`` and the wrappers of transformers' built-in implementations. Idempotent; runs on import."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, functools.partial(prepack_attention, own=_PLAIN_OWN))
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, functools.partial(prepack_mask, own=_PLAIN_OWN))
    for own in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
        implementation_for(own)


@dataclass
class _Hold:
    """Who holds one model's switch: ``calls`` entry points running now, and whether the user switched it."""

    calls: int = 0
    user: bool = False


# one hold per config object (the top one and its sub-configs share it): models sharing a config share its switch
_HOLDS = WeakIdKeyDictionary()
# how many prepack entry points this thread (this context) is inside: only their own model calls skip the mask
_INSIDE = contextvars.ContextVar("prepack_inside", default=0)


def _hold(model) -> _Hold:
    hold = _HOLDS.get(model.config)
    if hold is None:
        hold = _Hold()
        for c in _configs(model):
            _HOLDS[c] = hold
    return hold


def inside_entry_point() -> bool:
    """Whether this thread (context) is inside a prepack entry point, whose model calls all carry a packed layout."""
    return _INSIDE.get() > 0


def enable(model):
    """Switch ``model`` to prepack's attention until :func:`disable`: each config to ``"prepack|<its own>"``.

    Entry points switch the model for their own length without it; call this to keep it switched, e.g. to
    train on padding-free batches with transformers' ``Trainer``. Idempotent, visible in
    ``model.config._attn_implementation``. Calls without a packed layout keep computing exactly what the
    model's own implementation computes, so this is safe for every other user of the model or of a shared config.

    Returns:
        ``model``.
    """
    check_model(model)
    with _LOCK:
        install_mixers(model)
        _switch_on(model)
        _hold(model).user = True
    return model


def disable(model):
    """Undo :func:`enable`: each config back to the implementation prepack wrapped. Returns ``model``.

    Calls running now keep the switch until the last of them returns; it is set back then.
    """
    with _LOCK:
        hold = _hold(model)
        hold.user = False
        if hold.calls == 0:
            _switch_off(model)
    return model


@contextlib.contextmanager
def switched(model) -> Iterator[None]:
    """Hold ``model`` switched to prepack's attention for the length of a ``with`` block (reference-counted).

    The first holder switches it (unless it is switched already: then it stays, as the user's), the last
    one to leave sets it back. Inside, this thread's maskless causal calls build no (T, T) mask.
    """
    _acquire(model)
    inside = _INSIDE.set(_INSIDE.get() + 1)
    try:
        yield
    finally:
        _INSIDE.reset(inside)
        _release(model)


def switched_iter(model, items: Iterator) -> Iterator:
    """Yield what ``items`` yields, ``model`` held switched from the first item until exhausted or closed.

    Each step of ``items`` runs inside :func:`switched`'s scope; the caller's code between steps does not
    (a context variable set across a ``yield`` would leak into the caller's context).
    """
    _acquire(model)
    try:
        while True:
            inside = _INSIDE.set(_INSIDE.get() + 1)
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                _INSIDE.reset(inside)
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
        _release(model)


def holds(model) -> tuple[int, bool]:
    """(entry points holding ``model`` switched now, whether the user switched it): for tests and debugging."""
    with _LOCK:
        hold = _HOLDS.get(model.config)
        return (0, False) if hold is None else (hold.calls, hold.user)


def _acquire(model) -> None:
    check_model(model)
    with _LOCK:
        hold = _hold(model)
        if hold.calls == 0:
            install_mixers(model)  # once: a mixer already wrapped is left as it is
            # switched before the first call (enable, or loaded as "prepack|..."): the user's, left switched
            hold.user = is_enabled(model)
            _switch_on(model)
        hold.calls += 1


def _release(model) -> None:
    with _LOCK:
        hold = _hold(model)
        hold.calls -= 1
        if hold.calls == 0 and not hold.user:
            _switch_off(model)


def _switch_on(model) -> None:
    # a sub-config with no implementation set (None: no module of the model reads it, e.g. Moshi's audio encoder) stays
    plan = _switch_plan(model, lambda impl: None if impl is None or wrapped_implementation(impl) else implementation_for(impl))
    if plan is not None:
        model.set_attn_implementation(plan)
    not_switched = [
        c for c in _configs(model) if c._attn_implementation is not None and wrapped_implementation(c._attn_implementation) is None
    ]
    if not_switched:
        raise UnsupportedModelError(
            f"{type(model).__name__} did not take prepack's attention implementation (its config still says "
            f"{not_switched[0]._attn_implementation!r}); it cannot set its attention implementation dynamically"
        )


def _switch_off(model) -> None:
    plan = _switch_plan(model, wrapped_implementation)
    if plan is not None:
        model.set_attn_implementation(plan)


def require_switched(model) -> None:
    """Raise unless ``model`` is held switched: a packed call on a model that is not would reach the model's
    own attention, which would ignore the packed layout."""
    if not is_enabled(model):
        raise RuntimeError(
            f"{type(model).__name__} is not switched to prepack's attention; run packed calls inside "
            "prepack.hf.registration.switched(model) (every prepack entry point does), or call prepack.enable(model)"
        )


def is_enabled(model) -> bool:
    """Whether every config of ``model`` runs a prepack implementation."""
    return all(wrapped_implementation(c._attn_implementation) for c in _configs(model))


def _switch_plan(model, change) -> str | dict | None:
    """What to pass ``set_attn_implementation`` so each config gets ``change(its implementation)`` (None: keep)."""
    top = model.config
    wanted = change(top._attn_implementation)
    subs = {}
    for key in getattr(top, "sub_configs", {}) or {}:
        sub = getattr(top, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            new = change(sub._attn_implementation)
            if new is not None:
                subs[key] = new
    if wanted is None and not subs:
        return None
    if not subs or (wanted is not None and all(v == wanted for v in subs.values()) and len(subs) == len(top.sub_configs)):
        return wanted if wanted is not None else {"": top._attn_implementation, **subs}
    return {"": wanted if wanted is not None else top._attn_implementation, **subs}


def _configs(model) -> list:
    """Every config object of ``model`` (the top one and its sub-configs, at any depth)."""
    seen, out, stack = set(), [], [model.config]
    while stack:
        c = stack.pop()
        if id(c) in seen or not hasattr(c, "_attn_implementation"):
            continue
        seen.add(id(c))
        out.append(c)
        stack.extend(s for key in getattr(c, "sub_configs", {}) or {} if (s := getattr(c, key, None)) is not None)
    return out


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


@dataclass
class _TrainingBatch:
    """The layout of one padding-free forward, built by its first attention layer and read by the others.

    Attributes:
        key: (B, L, device) of the call that built it.
        version: the ``_version`` of the tensor it was built from (an in-place change builds it again).
        cu_q: (n + 1,) int32 cu_seqlens on the queries' device, derived from position ids; None: the call
            carries its own (``cu_seq_lens_q``), or its position ids do not restart (a plain call).
    """

    key: tuple
    version: int
    cu_q: torch.Tensor | None
    _chunked: dict = field(default_factory=dict)
    _kernels: dict = field(default_factory=dict)

    def kernel(self, dtype: torch.dtype, head_dim: int, softcap: float, sinks: bool) -> Kernel:
        """``auto``'s kernel for layers that ask this, chosen once per forward."""
        needs = (dtype, head_dim, softcap, sinks)
        if needs not in self._kernels:
            self._kernels[needs] = choose("auto", device=self.key[2], dtype=dtype,
                                          needs=Needs(head_dim=head_dim, softcap=softcap, sinks=sinks))
        return self._kernels[needs]

    def chunked(self, chunk: int, cu_q: torch.Tensor) -> tuple:
        """(cu_q, cu_k, max_q, max_k) for layers that attend within chunks of ``chunk`` tokens of the sequences
        ``cu_q`` ((n + 1,) int32, this batch's) bounds."""
        if chunk not in self._chunked:
            lengths = torch.diff(cu_q).cpu().numpy()  # one host sync per forward and chunk size, not per layer
            self._chunked[chunk] = StepLayout(lengths, lengths, self.key[2]).varlen_args(chunk)
        return self._chunked[chunk]


# Padding-free layouts by the tensor that carries them (cu_seq_lens_q, else position_ids): transformers
# hands every layer the very same tensor object, so the first layer builds the layout and the others find
# it. Keyed on the object's identity, the entry goes when the tensor does; nothing is written to the model.
_TRAINING = WeakIdKeyDictionary()
_TRAINING_LOCK = threading.Lock()
_TRAINING_MAX = 64  # tensors a caller keeps alive keep their entries: bounded, cleared when full


def _training_layout(source: torch.Tensor, key: tuple, build) -> _TrainingBatch:
    """The layout ``build()`` gives for ``source`` (its cu_q), made once per forward: again only for another
    (B, L, device) or after ``source`` changed in place."""
    if source.is_inference():  # no version counter to tell an in-place change: built for this layer alone
        return _TrainingBatch(key, 0, build())
    with _TRAINING_LOCK:
        entry = _TRAINING.get(source)
        if entry is None or entry.key != key or entry.version != source._version:
            if len(_TRAINING) >= _TRAINING_MAX:
                _TRAINING.clear()
            entry = _TRAINING[source] = _TrainingBatch(key, source._version, build())
        return entry


def _restarts(position_ids: torch.Tensor, batch: int, length: int, device) -> torch.Tensor | None:
    """cu_seqlens of a padding-free batch on ``device``, or None where the position ids do not restart."""
    cu = cu_seqlens_from_position_ids(position_ids, batch, length)
    return cu.to(device) if len(cu) - 1 > batch else None


def prepack_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, own=_PLAIN_OWN, **kwargs):
    """transformers attention signature: query (B, H, Lq, D), key/value (B, H_kv, Lk, D) -> ((B, Lq, H, D_v), None).

    Packed calls (a ``prepack=`` :class:`~prepack.executor.call.PackedCall`, transformers' ``cu_seq_lens_q``, or
    restarting ``position_ids`` with no mask and no cache) get varlen attention with the layer's semantics
    (window, chunk, soft-cap, sinks) from :func:`prepack.hf.support.layer_attention`, which raises for anything
    prepack does not implement. Every other call is the wrapped implementation ``own``'s.
    """
    B, H, Lq, D = query.shape
    call: PackedCall | None = kwargs.get("prepack")
    if call is None:  # a decoder layer that dropped prepack= but passed the forward's position_ids on
        call = call_of(kwargs.get("position_ids"))
    cu_q, batch = kwargs.get("cu_seq_lens_q"), None
    if call is None:
        if cu_q is not None:
            batch = _training_layout(cu_q, (B, Lq, query.device), lambda: None)  # holds no reference to its key
        elif attention_mask is None and Lq == key.shape[2] and kwargs.get("position_ids") is not None:
            batch = _training_layout(kwargs["position_ids"], (B, Lq, query.device), functools.partial(
                _restarts, kwargs["position_ids"], B, Lq, query.device))
            cu_q = batch.cu_q
            if cu_q is not None and mixes_outside_attention(getattr(module, "config", None)):
                raise UnsupportedModelError(
                    f"{type(module).__name__}: this padding-free batch marks its sequences by restarting position_ids "
                    "only, which the model's convolution / recurrent layers never see (they would run across the "
                    "sequences); pass cu_seq_lens_q too: DataCollatorWithFlattening(return_flash_attn_kwargs=True)"
                )
        if cu_q is None:
            if _INSIDE.get() > 0 and attention_mask is None and Lq == key.shape[2] and Lq > 1 and _is_causal(module, kwargs):
                # inside a prepack call this mask was skipped for a packed stream: the wrapped implementation's
                # causal attention would run across the packed prompts
                raise UnsupportedModelError(
                    f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) got no packed layout inside a "
                    "prepack call: its decoder layer passes neither prepack= nor the forward's position_ids on to "
                    "attention, so prepack cannot keep the packed prompts apart"
                )
            return _own_attention(own, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if attention_mask is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__} got an attention mask together with a packed layout; "
            "prepack cannot honour both: pass packed position_ids / cu_seq_lens without an attention_mask"
        )
    sem = layer_attention(module, kwargs, B * Lq)
    scale = D ** -0.5 if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    if call is None:  # a training batch: transformers' layout kwargs; kernel and layout made by its first layer
        kernel = batch.kernel(query.dtype, max(D, value.shape[3]), sem.softcap, sem.sinks is not None)
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q, max_k = kwargs.get("max_length_q") or Lq, kwargs.get("max_length_k") or key.shape[2]
        if sem.chunk is not None:
            cu_q, cu_k, max_q, max_k = batch.chunked(sem.chunk, cu_q)
    else:
        kernel = call.kernel
        if call.kv is not None:  # the call's KV source: a decode step's store, a recorder, earlier keys to continue
            key, value = call.kv.extend(_layer_of(module, call.kv), key, value, sem.window or sem.chunk)
        if call.row_mask is not None:  # rows of capacity C under dense block-diagonal masks (the prepacking paper's layout)
            out = dense_attention(
                query, key, value, call.row_mask(sem.window, sem.chunk), scale=scale, softcap=sem.softcap,
                dropout_p=dropout, sinks=sem.sinks,
            )
            return out.transpose(1, 2), None
        cu_q, cu_k, max_q, max_k = call.layout.varlen_args(sem.chunk)
    refusal = kernel.refusal(Needs(softcap=sem.softcap, sinks=sem.sinks is not None, window=bool(sem.window or sem.chunk)))
    if refusal:
        raise UnsupportedModelError(f"{type(module).__name__}: {refusal}")
    q = query.transpose(1, 2).reshape(B * Lq, H, D)
    k = key.transpose(1, 2).reshape(-1, key.shape[1], D)
    v = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[3])
    extra = {} if sem.sinks is None else {"sinks": sem.sinks}
    out = kernel.fn(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale, causal=True,
        window_size=(sem.window - 1, 0) if sem.window else (-1, -1), softcap=sem.softcap, **extra,
    )
    return out.view(B, Lq, H, value.shape[3]), None


def _own_attention(own: str, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """A call with no packed layout: exactly the wrapped implementation ``own``, under its own mask."""
    for name in PREPACK_KWARGS:
        kwargs.pop(name, None)
    if attention_mask is None and _is_causal(module, kwargs) and query.shape[2] == key.shape[2]:
        # prepack_mask built nothing for this maskless causal call: build the mask ``own`` would have
        attention_mask = _own_mask(own, module, query, kwargs)
    return _own_function(own, module)(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _is_causal(module, kwargs: dict) -> bool:
    return kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False


def _own_function(own: str, module):
    """``own``'s attention function; for ``eager``, the one in the module's own modeling file."""
    from transformers import AttentionInterface

    if own == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return fn if fn is not None else _explicit_eager
    return AttentionInterface()[own]


def _explicit_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, s_aux=None, sinks=None, **_):
    """Eager attention written out, for a modeling file without ``eager_attention_forward``."""
    mask = None
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    else:
        mask = segment_mask(query.shape[2], key.shape[2], (-1, 0), query.device)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = dense_attention(
        query, key, value, mask, scale=scale, softcap=softcap or 0.0, dropout_p=dropout if module.training else 0.0,
        sinks=s_aux if s_aux is not None else sinks,
    )
    return out.transpose(1, 2), None


def _own_mask(own: str, module, query, kwargs: dict):
    """The mask ``own``'s mask function gives a maskless, cacheless causal call of this layer (None where it needs none)."""
    from transformers import masking_utils

    sem = _layer_window(module, kwargs)
    B, _, L, _ = query.shape
    if sem[0]:
        fn, local = masking_utils.sliding_window_causal_mask_function(sem[0]), sem[0]
    elif sem[1]:
        fn, local = masking_utils.chunked_causal_mask_function(sem[1], torch.zeros(B, dtype=torch.long, device=query.device)), sem[1]
    else:
        fn, local = masking_utils.causal_mask_function, None
    extra = {} if local is None else {"local_size": local}
    return masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[own](
        batch_size=B, q_length=L, kv_length=L, q_offset=0, kv_offset=0, mask_function=fn, attention_mask=None,
        allow_is_causal_skip=True, dtype=query.dtype, config=module.config, use_vmap=False, device=query.device, **extra,
    )


def _layer_window(module, kwargs: dict) -> tuple[int | None, int | None]:
    """(sliding window, chunk) of this layer's own mask, read as transformers' mask builders read them."""
    config = getattr(module, "config", None)
    types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    layer_type = types[idx] if types is not None and idx is not None and 0 <= idx < len(types) else None
    window = kwargs.get("sliding_window")
    if layer_type == "sliding_attention" and not window:
        window = getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None) if layer_type == "chunked_attention" else None
    return (int(window) if window else None), (int(chunk) if chunk else None)


def prepack_mask(*args, own=_PLAIN_OWN, **kwargs):
    """The mask for ``"prepack|<own>"``: None for a maskless, cacheless causal call, else ``own``'s mask.

    With no padding mask, no cache offset and a causal mask function (plain, sliding, chunked, packed
    ``position_ids``, or an image-block overlay with no image in the call: :func:`prepack.hf.causal_masks.is_plain_causal`), attention computes everything from ``position_ids`` or the call's
    packed layout, so no (T, T) mask is built (inside prepack's own calls, or on a model the user switched:
    see :func:`_skips_masks`). Overlays (custom ``or``/``and`` mask functions,
    image-token blocks), bidirectional masks, padding and caches get ``own``'s mask.
    """
    mask_function = kwargs.get("mask_function")
    if (
        _skips_masks(kwargs.get("config"))
        and kwargs.get("attention_mask") is None
        and not kwargs.get("use_vmap")
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
        and is_plain_causal(mask_function)
    ):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[own](*args, **kwargs)


def _skips_masks(config) -> bool:
    """Whether a maskless causal call may go without a mask: inside a prepack entry point on this thread,
    or on a config the user switched. Any other call (another thread's, while an entry point holds the
    switch) gets its own implementation's mask, so it computes the same whether its layers run before or
    after the switch is set back."""
    if _INSIDE.get() > 0:
        return True
    if config is None:
        return False
    hold = _HOLDS.get(config)
    return hold is None or hold.user  # never held by an entry point: the switch is the user's own


def attention_needs(model, *, continues_keys: bool = False) -> Needs:
    """What ``model``'s attention layers ask of a kernel, for choosing one before the first forward.

    Read from the config and the modules: the widest head dim the config names (``head_dim``, ``qk_head_dim``,
    ``v_head_dim``, ``global_head_dim``, ..., else hidden_size / num_attention_heads), the attention logit
    soft-capping, attention sinks, and sliding-window or chunked layers.

    Args:
        continues_keys: the call's queries continue keys computed earlier (a shared prefix).
    """
    config = model.config.get_text_config(decoder=True)
    dims = [d for key, d in vars(config).items() if key.endswith("head_dim") and isinstance(d, int) and d > 0]
    if not dims and getattr(config, "hidden_size", None) and getattr(config, "num_attention_heads", None):
        dims = [config.hidden_size // config.num_attention_heads]
    window = bool(getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None))
    return Needs(
        head_dim=max(dims) if dims else None,
        softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        sinks=has_attention_sinks(model),
        window=window,
        continues_keys=continues_keys,
    )


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The name ``model.forward`` / ``generate`` take a cache under: transformers 5.x renamed
    ``past_key_values`` to ``cache``; use whichever this model takes."""
    return _cache_kwarg_for(type(unwrap(model)))  # the class's signature, under any wrapper


def _layer_of(module, kv):
    """Which layer's keys ``module`` writes: its ``layer_idx``; for one attention block shared by several layers
    (Zamba's, whose ``layer_idx`` is None or -1 and whose caller passes the layer on to the cache only), the
    layer its call order in this forward gives (:meth:`prepack.executor.kvstore.StepKV.shared_layer`)."""
    layer = getattr(module, "layer_idx", None)
    if (layer is None or layer < 0) and hasattr(kv, "shared_layer"):
        return kv.shared_layer(module)
    return layer
