"""State-space mixers (Mamba2, Zamba's Mamba) as :mod:`prepack.mixers` kinds; Mamba2 packed in one call.

Every Mamba2-style mixer in transformers (``Mamba2Mixer``, ``BambaMixer``, ``NemotronHMamba2Mixer``,
``FalconH1Mixer``, ``GraniteMoeHybridMambaLayer``, ``Zamba2MambaMixer``) runs its convolution and its
scan through two functions of its modeling file, ``causal_conv1d_forward`` and ``mamba2_scan_forward``,
which it lists in ``use_kernelized_func``: the ``kernels`` package gives each mixer instance its own
copy of each (``module._kernel_funcs[name]``, an ``nn.Module``), the one ``kernelize`` swaps "for a
runtime that manages the conv / recurrent state itself" (transformers' docstring). The mixer forwards
every keyword it gets to both.

:func:`install` puts prepack's runtime there, once per mixer: an instance-level ``forward`` on those
two per-instance functions that runs the modeling file's own function unless the call carries
causal-conv1d's / mamba-ssm's ``seq_idx`` keyword (the segment of each token of a ``(1, T)`` stream).
With ``seq_idx`` the conv and the scan keep the segments apart -- exactly, with
:func:`prepack.ssm.segment_conv1d` and :func:`prepack.ssm.ssd_scan` on any device, or with
causal-conv1d's and mamba-ssm's CUDA kernels where they import -- so the mixer's own forward runs once
over all the packed prompts. Nothing is written to the model per call. A third hook,
``mamba_split_conv1d_scan_combined`` (the fused training kernel, which transformers' torch code does not
implement), declines a packed CPU call so that the mixer takes the two hooks above.

Kinds registered here (:func:`prepack.mixers.register_kind`): ``mamba2`` (that one-call path; per segment
through the mixer's own forward where it is not installed, or where each request's states are kept),
``zamba_mamba`` (Zamba's per-head Mamba, whose scan takes no keywords: per segment), ``mamba_layer`` (Jamba's
Mamba decoder layer, run whole per segment: it passes no keyword on to its mixer, but gets them itself) and
``mamba1`` (a Mamba1 mixer anywhere else: Mamba's and FalconMamba's blocks pass it no keyword, so a packed call
never reaches it with its layout and the wrapper refuses it, naming the layer).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from . import ssm
from .kinds import MixerKind, VarlenKernels, register_kind

CONV_HOOK = "causal_conv1d_forward"
SCAN_HOOK = "mamba2_scan_forward"
FUSED_HOOK = "mamba_split_conv1d_scan_combined"
# The attributes transformers' mamba2_scan_forward reads from the mixer (its geometry and parameters).
MIXER_ATTRIBUTES = (
    "A_log", "D", "dt_bias", "num_heads", "head_dim", "n_groups", "ssm_state_size", "chunk_size",
    "time_step_limit", "intermediate_size", "layer_idx", "conv1d",
)


def hook_funcs(module) -> dict | None:
    """The mixer's per-instance kernel functions (``kernels``' ``use_kernelized_func``), or None."""
    funcs = module.__dict__.get("_kernel_funcs")
    if not isinstance(funcs, dict) or CONV_HOOK not in funcs or SCAN_HOOK not in funcs:
        return None
    if not all(hasattr(module, a) for a in MIXER_ATTRIBUTES):
        return None
    return funcs


def install(module) -> bool:
    """Put prepack's segment-aware conv and scan on ``module``'s per-instance hooks (idempotent).

    Returns False (installing nothing) where the mixer has no such hooks (``kernels`` is not installed,
    so the ``mamba2`` kind's one-call path is not ready either and its packed prompts run one segment at
    a time through its own forward). Refuses a mixer whose hooks something else replaced already
    (``kernels``' ``kernelize`` with a hub kernel): prepack cannot tell whether that kernel keeps packed
    prompts apart, and the one-call path would hand it ``seq_idx``.
    """
    from ..hf.support import UnsupportedModelError

    funcs = hook_funcs(module)
    if funcs is None:
        return False
    wanted = {CONV_HOOK: _conv_forward, SCAN_HOOK: _scan_forward}
    if FUSED_HOOK in funcs:
        wanted[FUSED_HOOK] = _fused_forward
    for name, hook in wanted.items():
        current = funcs[name].__dict__.get("forward")
        if current is not None and getattr(current, "__func__", None) is not hook:
            raise UnsupportedModelError(
                f"{type(module).__name__} (layer {module.layer_idx}) has its {name} hook replaced already (kernels' "
                "kernelize); prepack cannot tell whether that kernel keeps packed prompts apart"
            )
    for name, hook in wanted.items():
        funcs[name].forward = types.MethodType(hook, funcs[name])
    return True


def installed(module) -> bool:
    """Whether ``module``'s conv and scan hooks are prepack's."""
    funcs = hook_funcs(module)
    return funcs is not None and all(
        getattr(funcs[n].__dict__.get("forward"), "__func__", None) is h
        for n, h in ((CONV_HOOK, _conv_forward), (SCAN_HOOK, _scan_forward))
    )


def _lengths(seq_idx: torch.Tensor, tokens: int) -> np.ndarray:
    """(n,) int64 host segment lengths from a (1, T) ``seq_idx`` of consecutive segment indices."""
    if seq_idx.dim() != 2 or seq_idx.shape[0] != 1 or seq_idx.shape[1] != tokens:
        raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}; a packed (1, {tokens}) stream takes (1, {tokens})")
    lengths = torch.bincount(seq_idx[0].long()).cpu().numpy()
    if (lengths == 0).any() or not bool((seq_idx[0, 1:] >= seq_idx[0, :-1]).all()):
        raise ValueError("seq_idx must number the segments 0, 1, ... in stream order")
    return lengths


def _refuse_cache(cache, what: str) -> None:
    if cache is not None:
        raise ValueError(
            f"{what} got both a cache and seq_idx: one cache holds one request's state, so a packed call keeps "
            "states per request elsewhere (prepack runs such segments one at a time)"
        )


def _conv_forward(self, conv1d, hidden_states, cache, layer_idx, activation=None, state_idx=0, **kwargs):
    """``causal_conv1d_forward`` with ``seq_idx``: the depthwise conv of a (1, C, T) stream per segment."""
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is None:
        return type(self).forward(self, conv1d, hidden_states, cache, layer_idx, activation=activation, state_idx=state_idx, **kwargs)
    _refuse_cache(cache, f"causal_conv1d_forward (layer {layer_idx})")
    lengths = _lengths(seq_idx, hidden_states.shape[-1])
    weight = conv1d.weight.squeeze(1)
    kernel = ssm.conv1d_kernel() if hidden_states.is_cuda else None
    if kernel is not None:
        out, _ = ssm.kernel_conv1d(kernel, hidden_states[0], weight, conv1d.bias, lengths, activation=activation)
    else:
        out, _ = ssm.segment_conv1d(hidden_states[0], weight, conv1d.bias, lengths, activation=activation)
    return out[None]


def _scan_forward(self, module, hidden_states, B, C, dt, cache, **kwargs):
    """``mamba2_scan_forward`` with ``seq_idx``: the SSD scan of a (1, T, H * P) stream per segment."""
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is None:
        return type(self).forward(self, module, hidden_states, B, C, dt, cache, **kwargs)
    _refuse_cache(cache, f"mamba2_scan_forward (layer {module.layer_idx})")
    _, tokens, _ = hidden_states.shape
    lengths = _lengths(seq_idx, tokens)
    args = (
        hidden_states[0].view(tokens, module.num_heads, module.head_dim),
        dt[0],
        -torch.exp(module.A_log.float()),
        B[0].view(tokens, module.n_groups, module.ssm_state_size),
        C[0].view(tokens, module.n_groups, module.ssm_state_size),
        lengths,
        module.chunk_size,
    )
    options = dict(D=module.D, dt_bias=module.dt_bias, dt_softplus=True, dt_limit=module.time_step_limit)
    kernel = ssm.ssd_scan_kernel() if hidden_states.is_cuda else None
    if kernel is not None:
        y, _ = ssm.kernel_ssd_scan(kernel, *args, **options)
    else:
        y, _ = ssm.ssd_scan(*args, **options)
    return y.reshape(1, tokens, module.intermediate_size)


def _fused_forward(self, *args, **kwargs):
    """``mamba_split_conv1d_scan_combined`` (train mode only): with ``seq_idx`` on CPU, None, which makes the
    mixer run its unfused path through the two hooks above (transformers' torch fallback returns None too)."""
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is not None and not seq_idx.is_cuda:
        return None
    return type(self).forward(self, *args, **kwargs)


def _is_mamba2(module) -> bool:
    return all(hasattr(module, a) for a in MIXER_ATTRIBUTES) and hasattr(module, "in_proj") and hasattr(module, "out_proj")


# Mamba2 / Bamba / NemotronH / FalconH1 / GraniteMoeHybrid / Zamba2: in_proj -> causal conv1d -> SSD scan -> gated norm.
# The one-call path needs the per-instance hooks, which exist where `kernels` is installed (transformers' hub decorators
# are no-ops without it); on CUDA the hooks use causal-conv1d / mamba-ssm where they import, else the exact torch scans.
MAMBA2 = register_kind(MixerKind(
    name="mamba2",
    matches=_is_mamba2,
    layer_types=("linear_attention", "hybrid"),
    states=("conv", "ssm"),
    varlen=VarlenKernels(packages=("kernels",), devices=("cpu", "cuda"), kwargs=lambda cu, seq_idx: {"seq_idx": seq_idx}),
    prepare=install,
))

# Zamba: a Mamba1 mixer with per-head x / dt projections; its scan (selective_scan_fn) receives no keywords
ZAMBA_MAMBA = register_kind(MixerKind(
    name="zamba_mamba",
    matches=lambda m: type(m).__name__.endswith("MambaMixer") and all(
        hasattr(m, a) for a in ("conv1d", "A_log", "x_proj_weight", "dt_proj_weight", "n_mamba_heads", "layer_idx")
    ),
    layer_types=("linear_attention", "hybrid"),
    states=("conv", "ssm"),
))


def _is_mamba1(module) -> bool:
    return all(hasattr(module, a) for a in ("conv1d", "A_log", "x_proj", "dt_proj", "layer_idx")) and not hasattr(module, "chunk_size")


# Jamba: the decoder layer (norm -> Mamba1 mixer -> residual -> norm -> MLP / MoE -> residual) takes the call's keywords
# but hands its mixer none; every step but the mixer is per token, so the whole layer runs per segment
MAMBA_LAYER = register_kind(MixerKind(
    name="mamba_layer",
    matches=lambda m: type(m).__name__.endswith("MambaDecoderLayer") and _is_mamba1(getattr(m, "mamba", None)),
    layer_types=("linear_attention",),
    states=("conv", "ssm"),
))

# Mamba / FalconMamba (and any other Mamba1 mixer): matched so that a packed call that cannot reach it is refused
# by name when it runs (packed.py's check), rather than the model being called unsupported for a wrong reason
MAMBA1 = register_kind(MixerKind(
    name="mamba1", matches=_is_mamba1, layer_types=("linear_attention",), states=("conv", "ssm"), keywords_dropped=True,
))
