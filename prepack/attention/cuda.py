"""Step 3 on CUDA: FlashAttention varlen kernels behind ``flash_attn_varlen_func``'s signature.

Two kernels, both fp16/bf16 on CUDA only (the CPU backends live in :mod:`prepack.attention`):

``flash``
    flash-attn 2.x's ``flash_attn_varlen_func``, or flash-attn 4's (``flash_attn.cute``) behind an
    adapter. Needs the flash-attn package.
``torch_varlen``
    PyTorch's own FlashAttention-2 varlen kernel: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10),
    which calls ``aten._flash_attention_forward``. Nothing to install beyond torch. torch 2.10 takes only
    ``is_causal``; 2.12 adds ``scale``, ``window_size`` and ``enable_gqa``. The keywords are read from the
    installed signature; a call the installed ``varlen_attn`` cannot express (a window or an explicit scale
    on 2.10) goes to ``aten._flash_attention_forward`` with ``cum_seq_q/k`` directly. Without ``enable_gqa``
    the key/value heads are expanded.

Both mean what flash-attn means (windows normalised by :func:`prepack.attention.masks.flash_window`, bottom-right
causal alignment, 0 for a query that sees no key). What a kernel cannot compute exactly is refused with the
reason and the fix, never approximated: soft-capping and dropout for ``torch_varlen``, fp32, CPU tensors,
head dims above 256. What each kernel supports is declared once, in :data:`prepack.attention.registry.KERNELS`; this
module only probes the environment (is flash-attn importable, is torch new enough, is the GPU sm80+). Head dims that are not a multiple of 8, and a value head dim that differs from the
query/key one, are zero-padded to a common multiple of 8 (exact: zero columns add nothing to ``q @ k^T``,
the scale is kept at the original head dim, and the padded value columns are cut from the output).
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import masks

Backend = Callable[..., torch.Tensor]
HALF_DTYPES = (torch.float16, torch.bfloat16)
TORCH_VARLEN_MIN_VERSION = (2, 10)
MAX_HEAD_DIM = 256  # flash_api.cpp: "FlashAttention forward only supports head dimension at most 256"
HEAD_DIM_MULTIPLE = 8  # flash_api.cpp: "must have a head_size that is a multiple of 8"


# --- flash-attn -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlashAttn:
    """What importing flash-attn gave.

    Attributes:
        fn: a varlen function with flash-attn 2's signature, or None.
        version: ``"2"`` or ``"4"`` (``flash_attn.cute``), or None.
        error: why an installed flash-attn does not import (an ABI mismatch, a missing CuTe DSL), or
            None when it imports or is simply not installed.
    """

    fn: Backend | None
    version: str | None
    error: str | None


@functools.lru_cache(maxsize=1)
def find_flash_attn() -> FlashAttn:
    """Import flash-attn 2, else flash-attn 4, once per process (``find_flash_attn.cache_clear()`` to retry)."""
    try:
        from flash_attn import flash_attn_varlen_func

        return FlashAttn(flash_attn_varlen_func, "2", None)
    except ImportError as e:
        fa2 = None if _not_installed(e, "flash_attn") else e
    try:
        from flash_attn.cute import flash_attn_varlen_func as fa4
    except ImportError as e:
        fa4 = None if _not_installed(e, "flash_attn.cute") else e
    else:
        return FlashAttn(functools.partial(flash_attn_4, fa4), "4", None)
    broken = fa2 or fa4
    if broken is None:
        return FlashAttn(None, None, None)
    hint = ""
    if broken is fa4 and isinstance(fa4, ModuleNotFoundError) and (fa4.name or "").startswith("cutlass"):
        # nvidia-cutlass-dsl is a meta package whose .pth file puts cutlass on the path: pip --target skips it
        hint = " (flash-attn 4 needs nvidia-cutlass-dsl installed by pip into site-packages, not with --target)"
    return FlashAttn(None, None, f"{type(broken).__name__}: {broken}{hint}")


def _not_installed(e: ImportError, module: str) -> bool:
    """True when ``e`` says ``module`` itself is absent, not that it failed while importing."""
    top = module.split(".")[0]
    if isinstance(e, ModuleNotFoundError):
        return e.name in (module, top)
    # flash-attn 4 alone installs flash_attn/cute without flash_attn/__init__.py: flash_attn is then a
    # namespace package with no flash_attn_varlen_func, which means flash-attn 2 is not installed
    pkg = sys.modules.get(top)
    return e.name == top and pkg is not None and getattr(pkg, "__file__", None) is None


def _warn_broken_flash(error: str) -> None:
    # a plain warnings.warn: Python's default filter shows it once per call site, not once per layer
    warnings.warn(
        f"flash-attn is installed but does not import ({error}); backend='auto' skips it. "
        "Reinstall flash-attn for this torch/CUDA, or uninstall it to silence this warning.",
        RuntimeWarning, stacklevel=4,
    )


def flash_attn_4(
    fa4, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
) -> torch.Tensor:
    """flash-attn 4 under flash-attn 2's signature: None for an unbounded window side, no dropout, no lse."""
    if dropout_p:
        raise ValueError("flash-attn 4 has no attention dropout; use backend='sdpa_varlen' to train with dropout_p > 0")
    left, right = masks.flash_window(window_size, causal, _max_len(cu_seqlens_k, max_seqlen_k))
    plain_causal = (left, right) == (-1, 0)
    out = fa4(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=plain_causal,
        window_size=(None, None) if plain_causal else tuple(None if w < 0 else w for w in (left, right)),
        softcap=softcap,
    )
    return out[0] if isinstance(out, tuple) else out


# --- torch_varlen ---------------------------------------------------------------------------------

def _torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def torch_varlen_import_problem(version: tuple[int, int] | None = None) -> str | None:
    """Why ``torch.nn.attention.varlen.varlen_attn`` is not there, or None.

    Args:
        version: (major, minor) of torch; default: the installed one.
    """
    version = _torch_version() if version is None else tuple(version)
    if version < TORCH_VARLEN_MIN_VERSION:
        need = ".".join(map(str, TORCH_VARLEN_MIN_VERSION))
        return (
            f"backend='torch_varlen' needs torch >= {need} (torch.nn.attention.varlen.varlen_attn); this is torch "
            f"{'.'.join(map(str, version))}: upgrade torch, or use backend='sdpa_varlen'"
        )
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError as e:
        return f"backend='torch_varlen': torch.nn.attention.varlen does not import ({e}); use backend='sdpa_varlen'"
    return None


def flash_problem(device=None) -> str | None:
    """Why ``backend="flash"`` cannot run here (flash-attn missing or broken; on ``device``, no usable GPU), or None."""
    fa = find_flash_attn()
    if fa.error is not None:
        return (
            f"backend='flash': flash-attn is installed but does not import ({fa.error}); reinstall it for "
            f"torch {torch.__version__}, or use backend='torch_varlen' or 'sdpa_varlen'"
        )
    if fa.fn is None:
        return (
            "backend='flash' needs flash-attn: pip install 'prepack[flash]' (it builds against CUDA), "
            "or flash-attn-4 on Hopper/Blackwell; or use backend='torch_varlen' (torch >= 2.10) or 'sdpa_varlen'"
        )
    return _gpu_problem("flash", device)


def torch_varlen_problem(device=None) -> str | None:
    """Why ``backend="torch_varlen"`` cannot run here (torch too old; on ``device``, no GPU or one before sm80), or None."""
    return torch_varlen_import_problem() or _gpu_problem("torch_varlen", device)


def _gpu_problem(name: str, device) -> str | None:
    """Why the GPU of ``device`` cannot run kernel ``name`` (None: ``device`` not known, not checked)."""
    if device is None:
        return None
    if not torch.cuda.is_available():
        return f"backend={name!r} needs a CUDA GPU, and none is visible; use backend='auto' or 'sdpa_varlen'"
    index = torch.device(device).index
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index)
    if name == "torch_varlen" and major < 8 and torch.version.hip is None:
        return (
            f"backend='torch_varlen' needs an Ampere or newer GPU (sm80+), but {torch.device(device)} is "
            f"sm{major}{minor}: use backend='sdpa_varlen'"
        )
    return None


def warn_if_flash_broken() -> None:
    """Report an installed flash-attn that fails to import (a ``RuntimeWarning``), rather than skip it silently."""
    fa = find_flash_attn()
    if fa.error is not None:
        _warn_broken_flash(fa.error)


def torch_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
) -> torch.Tensor:
    """PyTorch's FlashAttention varlen kernel (``varlen_attn``) under ``flash_attn_varlen_func``'s signature.

    Args:
        q: (total_q, H, D) fp16/bf16 on CUDA.
        k, v: (total_k, H_kv, D), (total_k, H_kv, D_v); ``H`` a multiple of ``H_kv``.
        cu_seqlens_q, cu_seqlens_k: (n + 1,) int32.

    Returns:
        (total_q, H, D_v), of q's dtype.
    """
    from .registry import KERNELS, KernelRefused, Needs  # the registry imports this module

    problem = KERNELS["torch_varlen"].problem(q.device, q.dtype, Needs(head_dim=max(q.shape[-1], v.shape[-1])))
    if problem:
        raise KernelRefused(problem)
    return torch_varlen_checked_once(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
    )


def torch_varlen_checked_once(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
) -> torch.Tensor:
    """:func:`torch_varlen` for a caller that checked the device once for the whole call
    (:func:`prepack.attention.registry.choose`): no device query per layer."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_call(
        varlen_attn, torch.ops.aten._flash_attention_forward, q, k, v, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap,
    )


def varlen_call(
    varlen_attn, flash_forward, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
) -> torch.Tensor:
    """flash-attn's varlen semantics on ``varlen_attn`` (any torch >= 2.10 signature) or ``flash_forward``.

    Args:
        varlen_attn: ``torch.nn.attention.varlen.varlen_attn`` (or a function with its signature).
        flash_forward: ``torch.ops.aten._flash_attention_forward`` (or a function with its schema), used
            where ``varlen_attn`` lacks a keyword the call needs.
        The rest: as :func:`torch_varlen`.
    """
    if dropout_p:
        raise ValueError(
            "backend='torch_varlen' has no attention dropout (varlen_attn runs with dropout 0); "
            "use backend='sdpa_varlen' to train with dropout_p > 0"
        )
    from .registry import KERNELS, Needs  # the registry imports this module

    d, d_v = q.shape[-1], v.shape[-1]
    refusal = KERNELS["torch_varlen"].refusal(Needs(softcap=softcap, head_dim=max(d, d_v)))  # what the kernel declares
    if refusal:
        raise ValueError(refusal)
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    width = _padded_dim(max(d, d_v))
    if q.shape[0] == 0 or len(cu_seqlens_q) < 2:
        return q.new_zeros(*q.shape[:-1], d_v)  # the kernel refuses an empty batch
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    max_q, max_k = _max_len(cu_seqlens_q, max_seqlen_q), _max_len(cu_seqlens_k, max_seqlen_k)
    window = masks.flash_window(window_size, causal, max_k)
    # one head dim for q, k and v, a multiple of 8: zero columns change neither q @ k^T nor the kept outputs
    q, k, v = (_pad_last(x, width) for x in (q, k, v))
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32).contiguous() for c in (cu_seqlens_q, cu_seqlens_k))

    takes = _keywords(varlen_attn)
    plain = window in ((-1, -1), (-1, 0))
    if ("window_size" in takes or plain) and ("scale" in takes or scale == width ** -0.5):
        kwargs = {"window_size": window} if "window_size" in takes else {"is_causal": window == (-1, 0)}
        if "scale" in takes:
            kwargs["scale"] = scale
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in takes:
                kwargs["enable_gqa"] = True
            else:  # torch 2.10/2.11: one key/value head per query head
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    else:
        missing = {"window_size_left", "window_size_right"} - _keywords(flash_forward) if not plain else set()
        if missing:
            raise RuntimeError(
                f"backend='torch_varlen': this torch ({torch.__version__}) has no sliding-window FlashAttention "
                f"(window_size={tuple(window_size)}); upgrade torch, or use backend='sdpa_varlen'"
            )
        # the kernel itself takes grouped heads, an explicit scale and (left, right) windows
        out = flash_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, window == (-1, 0), False,
            scale=scale, window_size_left=window[0], window_size_right=window[1],
        )[0]
    out = out[0] if isinstance(out, tuple) else out
    return out if width == d_v else out[..., :d_v].contiguous()


def _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, which is not a multiple of the {k.shape[1]} key/value heads")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; tokens and heads must match")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head dim {q.shape[-1]} but k has {k.shape[-1]}; they must match")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(
            f"cu_seqlens_q has {len(cu_seqlens_q) - 1} segments but cu_seqlens_k has {len(cu_seqlens_k) - 1}"
        )


def _max_len(cu_seqlens: torch.Tensor, given) -> int:
    """``given`` as an int (flash-attn takes ints; transformers may pass 0-d tensors), else from ``cu_seqlens``."""
    if given is not None:
        return int(given)
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0


def _padded_dim(d: int) -> int:
    return -(-d // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    x = x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernel wants a contiguous last dim


@functools.lru_cache(maxsize=None)
def _keywords(fn) -> frozenset[str]:
    """The keyword names ``fn`` takes: an aten op's schema arguments, or a Python signature's parameters."""
    op = getattr(fn, "default", fn)  # an OpOverloadPacket's default overload carries the schema
    schema = getattr(op, "_schema", None)
    if schema is not None:
        return frozenset(a.name for a in schema.arguments)
    return frozenset(inspect.signature(fn).parameters)


def __getattr__(name: str):
    """Names the one registry (:data:`prepack.attention.registry.KERNELS`) replaced, kept for one release."""
    from .. import backends  # the registry imports this module

    if f"kernels.{name}" in backends.DEPRECATED:
        return backends.deprecated("kernels", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
