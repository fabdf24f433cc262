"""The kernel decision, made once per call: each backend declares what it supports.

A packed call asks for a backend by name (``"auto"`` or one of :data:`BACKENDS`) and
states what the model's attention needs (:class:`Needs`: head dim, soft-capping, sinks,
windows, queries that continue earlier keys). :func:`choose` returns one :class:`Kernel`
for the whole call, checked against the device, the dtype and those needs; every layer
then calls ``kernel.fn`` without asking again (no per-layer device query). What a kernel
cannot do is refused with the fix named, as vLLM's backend selector does.

The functions themselves have ``flash_attn_varlen_func``'s signature: the CPU-capable ones
live in :mod:`prepack.attention`, the CUDA kernels in :mod:`prepack.kernels`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import attention, kernels

BACKENDS: tuple[str, ...] = ("flash", "torch_varlen", "sdpa_varlen", "sdpa_masked", "flex", "reference")
# Backends that take ``sinks=`` (attention sinks); the CUDA kernels have no such argument.
SINK_BACKENDS: tuple[str, ...] = ("sdpa_varlen", "sdpa_masked", "flex", "reference")


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
    """One attention backend and what it supports.

    Attributes:
        name: its name in :data:`BACKENDS`.
        fn: the varlen attention function (``flash_attn_varlen_func``'s signature).
        cuda_only: runs on CUDA only, in float16 / bfloat16.
        softcap, sinks, window, continues_keys: whether it implements each feature of :class:`Needs`.
        rows: lays requests out in rows of ``capacity`` tokens under dense masks (``sdpa_masked``).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    cuda_only: bool = False
    softcap: bool = True
    sinks: bool = True
    window: bool = True
    continues_keys: bool = True
    rows: bool = False

    def refusal(self, needs: Needs) -> str | None:
        """Why this kernel cannot give what ``needs`` asks, naming the fix; None when it can."""
        if needs.sinks and not self.sinks:
            return f"backend {self.name!r} has no attention sinks; use one of {', '.join(SINK_BACKENDS)}"
        if needs.softcap and not self.softcap:
            return f"backend {self.name!r} has no attention logit soft-capping (softcap={needs.softcap}); use 'flash' or 'sdpa_varlen'"
        if needs.window and not self.window:
            return f"backend {self.name!r} has no sliding-window or chunked attention; use 'sdpa_varlen'"
        if needs.continues_keys and not self.continues_keys:
            return f"backend {self.name!r} lays requests out in rows and cannot continue earlier keys; use a varlen backend"
        return None


def _specs() -> dict[str, Kernel]:
    return {
        "flash": Kernel("flash", lambda *a, **k: kernels.find_flash_attn().fn(*a, **k), cuda_only=True, sinks=False),
        "torch_varlen": Kernel("torch_varlen", kernels.torch_varlen_checked_once, cuda_only=True, softcap=False, sinks=False),
        "sdpa_varlen": Kernel("sdpa_varlen", attention.sdpa_varlen),
        "sdpa_masked": Kernel("sdpa_masked", attention.sdpa_masked, continues_keys=False, rows=True),
        "flex": Kernel("flex", attention.flex),
        "reference": Kernel("reference", attention.reference),
    }


KERNELS: dict[str, Kernel] = _specs()


def choose(name: str, *, device=None, dtype: torch.dtype | None = None, needs: Needs = Needs()) -> Kernel:
    """The one kernel a call runs: ``name`` (``"auto"`` resolved), checked against device, dtype and ``needs``.

    ``auto`` on CUDA in fp16/bf16 is ``flash`` when flash-attn imports, else ``torch_varlen`` (PyTorch's own
    FlashAttention varlen kernel, torch >= 2.10, sm80+), else ``sdpa_varlen``, the fastest exact path we
    measured on CPU (docs/results.md); a kernel that cannot give what ``needs`` asks is skipped. A kernel named
    explicitly that cannot is refused: ``RuntimeError`` (device, dtype, installation) or ``ValueError``
    (a feature), each naming the fix.
    """
    if name == "auto":
        return KERNELS[_auto(device, dtype, needs)]
    if name not in KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    kernel = KERNELS[name]
    if kernel.cuda_only and (device is not None or dtype is not None):
        problem = kernels.kernel_problem(name, device=device, dtype=dtype, head_dim=needs.head_dim, softcap=needs.softcap)
        if problem:
            raise RuntimeError(problem)
    refusal = kernel.refusal(needs)
    if refusal:
        raise ValueError(refusal)
    return kernel


def _auto(device, dtype, needs: Needs) -> str:
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda and not needs.sinks:
        chosen = kernels.auto_kernel(device, dtype, head_dim=needs.head_dim, softcap=needs.softcap)
        if chosen is not None:
            return chosen
    return "sdpa_varlen"


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
    """The varlen attention function called ``name`` (``"auto"`` resolved for ``device`` and ``dtype``)."""
    name = resolve_backend(name, device=device, dtype=dtype, head_dim=head_dim, softcap=softcap)
    if name in kernels.KERNELS:
        return kernels.get_kernel(name, device=device, dtype=dtype)
    return KERNELS[name].fn


@functools.lru_cache(maxsize=64)
def training_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float, sinks: bool) -> Kernel:
    """The kernel for a padding-free call that carries no choice of its own (a Trainer batch): ``auto``."""
    return choose("auto", device=device, dtype=dtype, needs=Needs(head_dim=head_dim, softcap=softcap, sinks=sinks))
