"""The packed call in progress, for mixers whose model passes them no keyword (Mamba, FalconMamba).

Most of transformers' hybrid models hand their decoder layers' ``**kwargs`` on to the mixer, so
prepack's ``prepack=`` keyword (:class:`prepack.executor.call.PackedCall`) reaches it as it reaches
attention. Mamba's and FalconMamba's do not, at any level: ``MambaForCausalLM.forward`` calls its
backbone with named arguments only, the backbone calls each ``MambaBlock`` with ``cache`` and
``attention_mask`` only, and the block calls its mixer the same way. No keyword of the call reaches
the mixer, and there is no hook of transformers' to hand it one.

So for a :class:`prepack.mixers.MixerKind` with ``keywords_dropped`` set, :func:`install` registers,
once per model (``prepack.enable`` or the first entry point), a forward pre-hook and an always-called
forward hook (torch's own module hooks) on each module above such a mixer. A module called with
``prepack=`` pushes that call on a context variable for the length of its forward; the mixer's
wrapper (:func:`prepack.mixers.packed.call_segments`) reads it with :func:`active_call`. Modules
called without it (the blocks, a plain ``model(...)`` or ``model.generate``) change nothing, so a
plain call runs the model's own code unchanged. The variable is per thread and per ``contextvars``
context, and the hook that pushed a call pops it even when the forward raises: nothing is written
to the model per call, and nothing outlives the call.

Why hooks on the model rather than a wrapper on the block: the block never receives the keyword
either (the model above it drops it), so a wrapper there would have nothing to forward; and why not
a variable set by prepack's own entry points: the hook serves every caller that passes ``prepack=``
(the executor's steps, the decode engine, a user's own packed call) with one mechanism.

A padding-free training batch (transformers' ``cu_seq_lens_q``, or position ids restarting inside a row
with no padding mask) does not reach these mixers either: the hook refuses it rather than let the
sequences run into each other.
"""

from __future__ import annotations

import contextvars

import torch

from ..hf.support import UnsupportedModelError

# the calls of the forwards running now, innermost last (a tuple: each set makes a new value, nothing is shared)
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("prepack_active_call", default=())


def active_call():
    """The :class:`~prepack.executor.call.PackedCall` of the innermost forward running now with ``prepack=``, or None."""
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


def install(model, mixer_paths: list[str]) -> int:
    """Hook every module of ``model`` above the mixers at ``mixer_paths`` (idempotent). Returns the modules hooked now.

    Args:
        mixer_paths: dotted paths (``model.named_modules()``) of mixers whose kind has ``keywords_dropped``.
    """
    above = set()
    for path in mixer_paths:
        parts = path.split(".")
        above.update(".".join(parts[:i]) for i in range(len(parts)))
    modules = dict(model.named_modules())
    hooked = 0
    for path in sorted(above):
        module = modules[path]
        if any(h is _enter for h in module._forward_pre_hooks.values()):  # hooked already (or a deepcopy of one that was)
            continue
        module.register_forward_pre_hook(_enter, with_kwargs=True)
        module.register_forward_hook(_leave, with_kwargs=True, always_call=True)
        hooked += 1
    return hooked


def _enter(module, args, kwargs):
    call = kwargs.get("prepack")
    if call is None and (kwargs.get("cu_seq_lens_q") is not None or _restarts(kwargs)):
        raise UnsupportedModelError(
            f"{type(module).__name__} passes no keyword on to its mixers, so a padding-free batch's sequence bounds "
            "(cu_seq_lens_q, restarting position_ids) never reach them and its sequences would run into each other; "
            "train this model on a padded batch"
        )
    if call is not None:
        _ACTIVE.set(_ACTIVE.get() + (call,))


def _restarts(kwargs: dict) -> bool:
    """Whether a maskless call's (B, L) position_ids restart inside a row: a padding-free batch of several sequences."""
    pos = kwargs.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] < 2 or kwargs.get("attention_mask") is not None:
        return False
    return bool((pos[:, 1:] - pos[:, :-1] != 1).any())


def _leave(module, args, kwargs, output):
    if kwargs.get("prepack") is not None:
        _ACTIVE.set(_ACTIVE.get()[:-1])
