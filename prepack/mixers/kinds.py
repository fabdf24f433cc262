"""Which modules of a model are token mixers outside attention, and what each kind needs to run packed.

A *mixer* is a module that carries state from token to token without attention: a short causal
convolution (LFM2's ``ShortConv``), a gated delta-net (Qwen3.5's ``GatedDeltaNet``: a causal
convolution, then a chunked delta-rule recurrence), a Mamba block. Packed naively, each would carry
the state of one prompt into the next. A :class:`MixerKind` declares one such module type:

* how to recognise it (``matches``: a predicate over the module; structural, so a new model type
  with the same mixer is found without a list of names),
* the cache layer types its layers report (``layer_types``: transformers' ``layer_types`` /
  ``get_layer_types_and_kwargs`` names, e.g. ``"linear_attention"``, ``"conv"``),
* optionally a one-call varlen path (``varlen``): the keywords transformers' own mixer forwards to
  the field's varlen kernels (flash-linear-attention's ``cu_seqlens``, causal-conv1d's ``seq_idx``),
  and the packages and device it needs. Without it (or where they are missing) each segment runs
  through the module's own forward alone (:mod:`prepack.mixers.packed`).

Kinds are registered with :func:`register_kind`; the built-in ones are at the bottom.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class VarlenKernels:
    """A mixer's one-call packed path: transformers' own forward with the layout as keywords.

    Attributes:
        packages: import names the kernels come from (all must import), e.g. ``("fla", "causal_conv1d")``.
        devices: device types those kernels run on.
        kwargs: ``kwargs(cu_seqlens, seq_idx)`` -> the keywords to add to the module's forward, given
            (n + 1,) int32 ``cu_seqlens`` and (1, T) int32 ``seq_idx`` on the device.
    """

    packages: tuple[str, ...]
    devices: tuple[str, ...]
    kwargs: Callable[[torch.Tensor, torch.Tensor], dict]

    def ready(self, device: torch.device) -> bool:
        """Whether this path runs on ``device`` here (its kernels import and support the device)."""
        return device.type in self.devices and all(_importable(p) for p in self.packages)


@functools.lru_cache(maxsize=None)
def _importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class MixerKind:
    """One kind of token mixer outside attention.

    Attributes:
        name: short name (``"gated_delta_net"``, ``"short_conv"``, ``"mamba2"``, ...), used in errors and docs.
        matches: ``matches(module)`` -> whether ``module`` is a mixer of this kind.
        layer_types: the cache / config layer types of the decoder layers holding this mixer.
        states: what it carries from token to token (``("conv", "recurrent")``), for errors and docs.
        varlen: the one-call varlen path on the field's kernels, or None.
        prepare: ``prepare(module)``, run once per mixer by :func:`prepack.mixers.install` beside the
            wrapper, for what the kind's one-call path needs on the module (e.g. prepack's runtime on
            transformers' per-instance kernel hooks, :mod:`prepack.mixers.mamba`), or None.
        keywords_dropped: the model above the mixer passes it no keyword (Mamba's blocks): the packed call
            reaches it through :mod:`prepack.mixers.active` (hooks on the modules above it) instead.
        returns_state: the module returns ``(output, its final state)`` and its decoder layer keeps the output
            only (MiniMax's lightning attention): the packed call returns ``(output, None)``, as prepack's
            attention returns no weights; the states go to each segment's own cache.
    """

    name: str
    matches: Callable[[torch.nn.Module], bool]
    layer_types: tuple[str, ...]
    states: tuple[str, ...]
    varlen: VarlenKernels | None = field(default=None)
    prepare: Callable[[torch.nn.Module], object] | None = field(default=None)
    keywords_dropped: bool = False
    returns_state: bool = False


KINDS: list[MixerKind] = []


def register_kind(kind: MixerKind) -> MixerKind:
    """Add ``kind`` to the registry (a kind registered again under its name replaces the earlier one)."""
    KINDS[:] = [k for k in KINDS if k.name != kind.name] + [kind]
    return kind


def kind_of(module: torch.nn.Module) -> MixerKind | None:
    """The registered kind of ``module``, or None if it is not a known mixer."""
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


def mixer_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, MixerKind]]:
    """Every mixer of ``model`` as (path, module, kind), in module order (the outermost match; its children are its own)."""
    found, inside = [], None
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside + "."):
            continue
        kind = kind_of(module)
        if kind is not None:
            found.append((path, module, kind))
            inside = path
    return found


def mixer_layer_idx(module: torch.nn.Module) -> int | None:
    """The decoder layer a mixer belongs to: its ``layer_idx``, else its first submodule's (a mixer kind that is a
    whole decoder layer, Jamba's Mamba layer, keeps the index on its mixer), or None."""
    for sub in module.modules():
        idx = getattr(sub, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


# ---------------------------------------------------------------- built-in kinds


def _has(module, *names) -> bool:
    return all(hasattr(module, n) for n in names)


def _conv_seq_idx(cu_seqlens: torch.Tensor, seq_idx: torch.Tensor) -> dict:
    # transformers' gated delta-net forwards cu_seq_lens_q to chunk_gated_delta_rule(cu_seqlens=) and every other
    # keyword to causal_conv1d_fn, whose hub wrapper keeps those causal-conv1d's signature names (seq_idx)
    return {"cu_seq_lens_q": cu_seqlens, "seq_idx": seq_idx}


# Qwen3.5 / Qwen3.5-MoE / Qwen3-Next / OLMo-hybrid / Qwen4-exp: in_proj -> causal conv1d -> chunked gated delta rule
GATED_DELTA_NET = register_kind(MixerKind(
    name="gated_delta_net",
    matches=lambda m: type(m).__name__.endswith("GatedDeltaNet") and _has(m, "conv1d", "A_log", "dt_bias", "layer_idx"),
    layer_types=("linear_attention",),
    states=("conv", "recurrent"),
    varlen=VarlenKernels(packages=("fla", "causal_conv1d"), devices=("cuda",), kwargs=_conv_seq_idx),
))

# LFM2 / LFM2-MoE / LFM3: in_proj -> gated short causal conv1d -> out_proj
SHORT_CONV = register_kind(MixerKind(
    name="short_conv",
    matches=lambda m: type(m).__name__.endswith("ShortConv") and _has(m, "conv", "in_proj", "out_proj", "layer_idx"),
    layer_types=("conv",),
    states=("conv",),
    varlen=VarlenKernels(packages=("causal_conv1d",), devices=("cuda",), kwargs=lambda cu, seq_idx: {"seq_idx": seq_idx}),
))

# Kimi-Linear / Bailing-hybrid: causal conv1d on q, k, v -> chunked Kimi delta attention (KDA)
KIMI_DELTA_ATTENTION = register_kind(MixerKind(
    name="kimi_delta_attention",
    matches=lambda m: type(m).__name__.endswith("DeltaAttention") and _has(m, "conv1d", "forget_gate", "b_proj", "layer_idx"),
    layer_types=("linear_attention",),
    states=("conv", "recurrent"),
))


def seq_idx_of(q_lengths: np.ndarray, device) -> torch.Tensor:
    """(1, T) int32: the segment of each token of a packed stream, causal-conv1d's ``seq_idx``."""
    return torch.from_numpy(np.repeat(np.arange(len(q_lengths), dtype=np.int32), q_lengths))[None].to(device)
