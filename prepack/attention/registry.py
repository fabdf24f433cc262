"""The kernel decision, made once per call: each backend declares what it supports.

A packed call asks for a backend by name (``"auto"`` or one of :data:`BACKENDS`) and
states what the model's attention needs (:class:`Needs`: head dim, soft-capping, sinks,
windows, queries that continue earlier keys). :func:`choose` returns one :class:`Kernel`
for the whole call, checked against the device, the dtype and those needs; every layer
then calls ``kernel.fn`` without asking again (no per-layer device query). What a kernel
cannot do is refused with the fix named, as vLLM's backend selector does.

The functions themselves have ``flash_attn_varlen_func``'s signature: the CPU-capable ones
live in :mod:`prepack.attention`, the CUDA kernels in :mod:`prepack.attention.cuda`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import functions as attention
from . import cuda as kernels

BACKENDS: tuple[str, ...] = ("flash", "torch_varlen", "sdpa_varlen", "sdpa_masked", "flex", "reference")
# what backend="auto" tries, in order, on the call's device and dtype
AUTO_ORDER: tuple[str, ...] = ("flash", "torch_varlen", "sdpa_varlen")


class KernelRefused(ValueError, RuntimeError):
    """A kernel cannot run a call exactly (its device, dtype, installation, hardware or a feature the model
    needs), with the fix named. Both a ``ValueError`` and a ``RuntimeError``: callers caught either before
    the two registries became one."""


@dataclass(frozen=True)
class Needs:
    """What one call's attention asks of a kernel.

    Attributes:
        head_dim: the widest of the query/key and value head dims (None: not known).
        softcap: attention logit soft-capping (0.0: none).
        sinks: some layer has attention sinks (gpt-oss).
        window: some layer has a sliding window or chunked attention.
        continues_keys: queries attend to keys computed earlier (a shared prefix), so a
            segment's query length differs from its key length.
    """

    head_dim: int | None = None
    softcap: float = 0.0
    sinks: bool = False
    window: bool = False
    continues_keys: bool = False


@dataclass(frozen=True)
class Kernel:
    """One attention kernel and what it supports: the one registry (:data:`KERNELS`) :func:`choose` reads.

    Attributes:
        name: its name in :data:`BACKENDS`.
        fn: the varlen attention function (``flash_attn_varlen_func``'s signature), with no per-call checks:
            for a caller that chose the kernel (:func:`choose`) for the whole call.
        devices: the device types it runs on (None: any torch runs on).
        dtypes: the dtypes it computes in (None: any).
        max_head_dim: the widest head dim it takes, after padding to a multiple of 8 (None: no limit of its own).
        softcap, sinks, window, continues_keys: whether it implements each feature of :class:`Needs`.
        rows: lays requests out in rows of ``capacity`` tokens under dense masks (``sdpa_masked``).
        installed: why it is not usable in this environment (a missing package, a torch too old,
            hardware), given the call's device; None when it is. None: always usable.
        fix: what to do instead where a feature is refused (None: the kernels that have it are named).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    max_head_dim: int | None = None
    softcap: bool = True
    sinks: bool = True
    window: bool = True
    continues_keys: bool = True
    rows: bool = False
    installed: Callable[..., str | None] | None = None
    fix: str | None = None

    @property
    def cuda_only(self) -> bool:
        """Deprecated: ``devices == ("cuda",)``."""
        warnings.warn("Kernel.cuda_only is deprecated and goes in the next release; use Kernel.devices",
                      DeprecationWarning, stacklevel=2)
        return self.devices == ("cuda",)

    def refusal(self, needs: Needs) -> str | None:
        """Why this kernel cannot give what ``needs`` asks, naming the fix; None when it can. No device query."""
        if needs.sinks and not self.sinks:
            return f"backend {self.name!r} has no attention sinks; {self._instead('sinks')}"
        if needs.softcap and not self.softcap:
            return (
                f"backend {self.name!r} has no attention logit soft-capping (softcap={needs.softcap}); "
                f"{self._instead('softcap')}"
            )
        if needs.window and not self.window:
            return f"backend {self.name!r} has no sliding-window or chunked attention; {self._instead('window')}"
        if needs.continues_keys and not self.continues_keys:
            return f"backend {self.name!r} lays requests out in rows and cannot continue earlier keys; use a varlen backend"
        if needs.head_dim is not None and self.max_head_dim is not None and _padded(needs.head_dim) > self.max_head_dim:
            return (
                f"backend={self.name!r}: head dim {needs.head_dim} is above the {self.max_head_dim} that this kernel "
                "takes; use backend='sdpa_varlen'"
            )
        return None

    def problem(self, device=None, dtype: torch.dtype | None = None, needs: Needs = Needs()) -> str | None:
        """Why this kernel cannot run a call on ``device`` in ``dtype`` with ``needs`` (unknown arguments, None,
        are not checked), naming the fix; None when it can."""
        if device is not None and self.devices is not None and torch.device(device).type not in self.devices:
            return (
                f"backend={self.name!r} needs a CUDA GPU (FlashAttention is CUDA-only), but the model/tensors are on "
                f"{torch.device(device)}: use backend='sdpa_varlen' (or 'auto') there"
            )
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return (
                f"backend={self.name!r} takes float16 or bfloat16 (FlashAttention has no {dtype} kernel): load the model "
                f"with dtype=torch.bfloat16, or use backend='sdpa_varlen' for {dtype}"
            )
        return self.refusal(needs) or (self.installed(device) if self.installed is not None else None)

    def _instead(self, feature: str) -> str:
        if self.fix is not None:
            return self.fix
        having = [f"'{k.name}'" for k in KERNELS.values() if getattr(k, feature) and not k.rows]
        return f"use backend={having[0]}" + (f" (or {', '.join(having[1:])})" if len(having) > 1 else "")


def _padded(head_dim: int) -> int:
    return -(-head_dim // kernels.HEAD_DIM_MULTIPLE) * kernels.HEAD_DIM_MULTIPLE


def _specs() -> dict[str, Kernel]:
    cuda = dict(devices=("cuda",), dtypes=kernels.HALF_DTYPES, sinks=False)
    return {
        "flash": Kernel("flash", lambda *a, **k: kernels.find_flash_attn().fn(*a, **k), installed=kernels.flash_problem, **cuda),
        "torch_varlen": Kernel(
            "torch_varlen", kernels.torch_varlen_checked_once, max_head_dim=kernels.MAX_HEAD_DIM, softcap=False,
            installed=kernels.torch_varlen_problem, **cuda,
        ),
        "sdpa_varlen": Kernel("sdpa_varlen", attention.sdpa_varlen),
        "sdpa_masked": Kernel("sdpa_masked", attention.sdpa_masked, continues_keys=False, rows=True),
        "flex": Kernel("flex", attention.flex),
        "reference": Kernel("reference", attention.reference),
    }


KERNELS: dict[str, Kernel] = _specs()
# Backends that take ``sinks=`` (attention sinks); the CUDA kernels have no such argument.
SINK_BACKENDS: tuple[str, ...] = tuple(name for name, k in KERNELS.items() if k.sinks)
ROW_BACKENDS: tuple[str, ...] = tuple(name for name, k in KERNELS.items() if k.rows)


def choose(name, *, device=None, dtype: torch.dtype | None = None, needs: Needs = Needs()) -> Kernel:
    """The one kernel a call runs: ``name`` (``"auto"`` resolved), checked against device, dtype and ``needs``.

    Call it once per call and pass the :class:`Kernel` down. ``auto`` tries :data:`AUTO_ORDER` on the
    call's device and dtype: on CUDA in fp16/bf16 ``flash`` when flash-attn imports, else ``torch_varlen``
    (PyTorch's own FlashAttention varlen kernel, torch >= 2.10, sm80+), else ``sdpa_varlen``, the fastest
    exact path we measured on CPU (docs/results.md); a kernel that cannot give what ``needs`` asks is
    skipped. A kernel named explicitly that cannot is refused (:class:`KernelRefused`, naming the fix).
    A :class:`Kernel` given as ``name`` (chosen earlier in the call) is checked against ``needs`` only.
    """
    if isinstance(name, Kernel):
        kernel = name
        refusal = kernel.refusal(needs)
    elif name == "auto":
        return _auto(device, dtype, needs)
    elif name not in KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    else:
        kernel = KERNELS[name]
        refusal = kernel.problem(device, dtype, needs)
    if refusal:
        raise KernelRefused(refusal)
    return kernel


def _auto(device, dtype, needs: Needs) -> Kernel:
    known = device is not None and dtype is not None
    if known and torch.device(device).type == "cuda" and dtype in kernels.HALF_DTYPES:
        kernels.warn_if_flash_broken()
    for name in AUTO_ORDER:
        kernel = KERNELS[name]
        # a kernel for some devices or dtypes only is taken where the call's own are known to be among them
        restricted = kernel.devices is not None or kernel.dtypes is not None
        if restricted and not known:
            continue
        if kernel.problem(device, dtype, needs) is None:
            return kernel
    return KERNELS["sdpa_varlen"]


def resolve_backend(
    name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    head_dim: int | None = None, softcap: float = 0.0,
) -> str:
    """The name of the kernel :func:`choose` picks for ``name`` on ``device`` / ``dtype`` (see there)."""
    return choose(name, device=device, dtype=dtype, needs=Needs(head_dim=head_dim, softcap=softcap)).name


def get_backend(
    name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    head_dim: int | None = None, softcap: float = 0.0,
) -> Callable[..., torch.Tensor]:
    """The varlen attention function called ``name`` (``"auto"`` resolved for ``device`` and ``dtype``).

    A CUDA kernel's function checks each call's tensors (device, dtype, head dim), as it has no call to be chosen for.
    """
    kernel = choose(name, device=device, dtype=dtype, needs=Needs(head_dim=head_dim, softcap=softcap))
    if kernel.devices is None:
        return kernel.fn
    problem = kernel.installed(device)
    if problem:
        raise KernelRefused(problem)
    return kernels.find_flash_attn().fn if kernel.name == "flash" else kernels.torch_varlen


# --- names the one registry replaced, kept for one release -------------------------------------------

def _kernel_problem(name: str, *, device=None, dtype=None, head_dim=None, softcap: float = 0.0) -> str | None:
    if name not in ("flash", "torch_varlen"):
        raise ValueError(f"{name!r} is not a CUDA kernel; choose one of flash, torch_varlen")
    return KERNELS[name].problem(device, dtype, Needs(head_dim=head_dim, softcap=softcap))


def _auto_kernel(device, dtype, *, head_dim=None, softcap: float = 0.0) -> str | None:
    name = _auto(device, dtype, Needs(head_dim=head_dim, softcap=softcap)).name
    return None if name == "sdpa_varlen" else name


def _get_kernel(name: str, *, device=None, dtype=None):
    return get_backend(name, device=device, dtype=dtype)


def _training_kernel(device, dtype, head_dim: int, softcap: float, sinks: bool) -> Kernel:
    return choose("auto", device=device, dtype=dtype, needs=Needs(head_dim=head_dim, softcap=softcap, sinks=sinks))


DEPRECATED = {  # old name -> (what it is now, the replacement to name in the warning)
    "kernels.KERNELS": (("flash", "torch_varlen"), "prepack.attention.registry.KERNELS (Kernel objects; .devices == ('cuda',))"),
    "kernels.kernel_problem": (_kernel_problem, "prepack.attention.registry.KERNELS[name].problem(device, dtype, needs)"),
    "kernels.auto_kernel": (_auto_kernel, "prepack.attention.registry.choose('auto', ...)"),
    "kernels.get_kernel": (_get_kernel, "prepack.get_backend(name, ...)"),
    "backends.training_kernel": (_training_kernel, "prepack.attention.registry.choose('auto', ...)"),
}


def deprecated(module: str, name: str):
    """``module.name`` from :data:`DEPRECATED`, with a ``DeprecationWarning`` naming its replacement."""
    value, instead = DEPRECATED[f"{module}.{name}"]
    warnings.warn(f"prepack.{module}.{name} is deprecated and goes in the next release; use {instead}",
                  DeprecationWarning, stacklevel=3)
    return value


def __getattr__(name: str):
    """Names the one registry replaced, kept for one release (:data:`DEPRECATED`)."""
    if f"backends.{name}" in DEPRECATED:
        return deprecated("backends", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
