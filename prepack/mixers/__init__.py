"""Token mixers outside attention (short convolutions, gated delta-nets, state-space blocks), packed exactly.

* :mod:`prepack.mixers.kinds` — what a mixer is: :class:`MixerKind` declarations (how to recognise the
  module, its layer types, its states, its optional varlen-kernel path), the registry ``KINDS`` and
  :func:`mixer_modules`.
* :mod:`prepack.mixers.packed` — how a packed call reaches it: the wrapper :func:`install` puts on each
  mixer once, which runs the module's own forward once per segment (or once, on the field's varlen
  kernels), with each segment's state in the call's :class:`MixerStates`.
* :mod:`prepack.mixers.mamba` — the state-space kinds (Mamba2 family, Zamba, Jamba; Mamba / FalconMamba
  refused by name) and the Mamba2 one-call path: prepack's runtime on transformers' per-instance
  ``causal_conv1d_forward`` / ``mamba2_scan_forward`` hooks.
* :mod:`prepack.mixers.active` — the packed call in progress, for mixers whose model passes them no keyword
  (Mamba, FalconMamba): hooks on the modules above them, installed once.
* :mod:`prepack.mixers.lightning` — MiniMax's lightning (linear) attention, run per segment into the model's own
  ``MiniMaxCache``.
* :mod:`prepack.mixers.ssm` — the exact torch scans over a packed stream (segment conv1d, Mamba2's SSD,
  Mamba1's selective scan), each segment from its own state, and adapters for causal-conv1d / mamba-ssm.

See docs/hybrid.md and docs/ssm.md.
"""

from .kinds import KINDS, MixerKind, VarlenKernels, kind_of, mixer_modules, register_kind, seq_idx_of
from . import mamba  # noqa: F401, E402 - registers the state-space kinds
from . import lightning  # noqa: F401, E402 - registers MiniMax's lightning attention
from .packed import (
    CACHE_NAMES,
    LAYOUT_KWARGS,
    MixerStates,
    Segments,
    call_segments,
    continuation_refusal,
    install,
    installed,
    packed_forward,
    run_segments,
)

__all__ = [
    "CACHE_NAMES", "KINDS", "LAYOUT_KWARGS", "MixerKind", "MixerStates", "Segments", "VarlenKernels", "call_segments",
    "continuation_refusal", "install", "installed", "kind_of", "mixer_modules", "packed_forward",
    "register_kind", "run_segments", "seq_idx_of",
]
