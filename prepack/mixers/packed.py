"""A mixer over a packed stream: each segment from its own state, through the model's own code.

transformers exposes no registry for these mixers the way ``AttentionInterface`` serves attention:
its hub-kernel hooks (``chunk_gated_delta_rule``, ``causal_conv1d_fn``, ...) are resolved once, when
the modeling file is imported (flash-linear-attention or causal-conv1d if they import, else the
torch code, which ignores a packed layout), and swapped per instance only by the ``kernels``
package's ``kernelize``. So prepack installs, once per mixer module (:func:`install`, called by
:func:`prepack.enable` and by the first entry point that switches a model), an instance-level
``forward`` that runs the class's own ``forward`` unchanged unless the call carries a packed layout:

* ``prepack=`` (:class:`prepack.executor.call.PackedCall`, which the decoder layers pass on in ``**kwargs``)
  or transformers' ``cu_seq_lens_q`` (``DataCollatorWithFlattening``): the stream's segments are
  known. Where the kind's varlen kernels run on this device (:class:`prepack.mixers.kinds.VarlenKernels`:
  flash-linear-attention's ``cu_seqlens``, causal-conv1d's ``seq_idx``), the module's own forward runs
  once with those keywords; elsewhere (CPU) it runs once per segment on that segment's tokens, so each
  request's convolution window and recurrent state start from zero, exactly as the model alone.
* A segment that continues earlier tokens (key length > query length) needs the request's state: the
  call's :class:`MixerStates` hands the segment its own cache object (the model's own cache class), which
  the module's own code reads and updates; without one the call is refused, naming the layer and segment.
* Inside a prepack entry point, a mixer called *without* a packed layout means its decoder layer did
  not pass the layout on: refused, never run across the packed prompts.

Nothing is written to the model per call; the wrapper holds no state.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..hf.support import UnsupportedModelError
from . import active
from .kinds import kind_of, mixer_layer_idx, mixer_modules, seq_idx_of

# the names transformers' mixers take a cache under (5.x renamed past_key_values / cache_params to cache)
CACHE_NAMES = ("cache", "cache_params", "past_key_values", "past_key_value")
# per-token keywords a segment's call gets its own slice of (its positions restart at 0, as the prompt alone)
PER_TOKEN_KWARGS = ("position_ids",)
# the packed layout's keywords: the wrapper reads them, the per-segment calls get none
LAYOUT_KWARGS = ("prepack", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class MixerStates(Protocol):
    """Per-segment state holders of one packed call (``PackedCall.states``).

    ``cache_for(segment)`` -> the cache object (the model's own cache class, e.g. its ``DynamicCache``)
    of the request in that segment of the call's layout, or None for a segment that starts from zero state
    and whose final state nobody keeps. The mixer's own code reads the segment's initial conv/recurrent
    state from it and writes the final one back, exactly as in ``model(prompt, cache=...)`` alone.
    """

    def cache_for(self, segment: int): ...


class Segments(NamedTuple):
    """The segments of one packed mixer call.

    Attributes:
        q_lengths: (n,) int64 numpy, new tokens per segment (they sum to the stream's T).
        k_lengths: (n,) int64 numpy, tokens of the request up to the segment's end (> q: it continues).
        cu_seqlens: (n + 1,) int32 on the device.
        states: the call's :class:`MixerStates`, or None.
    """

    q_lengths: np.ndarray
    k_lengths: np.ndarray
    cu_seqlens: torch.Tensor
    states: MixerStates | None


def install(model) -> int:
    """Wrap the forward of every mixer of ``model`` once (idempotent). Returns the number of mixers.

    Refuses a mixer whose forward something else replaced per instance already (accelerate's offloading
    hooks, ``kernels.kernelize``): prepack would run past it.
    """
    found = mixer_modules(model)
    for path, module, kind in found:
        current = module.__dict__.get("forward")
        if current is None:
            module.forward = types.MethodType(packed_forward, module)
        elif getattr(current, "__func__", None) is not packed_forward:
            raise UnsupportedModelError(
                f"{path} ({type(module).__name__}) has its forward replaced on the instance already (accelerate "
                "offloading or kernels' kernelize); prepack cannot keep packed prompts apart in it"
            )
        if kind.prepare is not None:
            kind.prepare(module)
    active.install(model, [path for path, _, kind in found if kind.keywords_dropped])
    return len(found)


def installed(module) -> bool:
    """Whether ``module``'s forward is prepack's wrapper."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is packed_forward


def packed_forward(self, *args, **kwargs):
    """The wrapper :func:`install` puts on a mixer: the class's forward, per segment when the call is packed."""
    segments = call_segments(self, kwargs)
    if segments is None:
        _check_plain(self)
        return type(self).forward(self, *args, **kwargs)
    return run_segments(self, segments, args, kwargs)


def call_segments(module, kwargs: dict) -> Segments | None:
    """The segments a mixer call carries (``prepack=`` or ``cu_seq_lens_q``), or None for a plain call."""
    call = kwargs.get("prepack")
    if call is None and kind_of(module).keywords_dropped:
        call = active.active_call()  # the model above passed no keyword on: the call its top module got
    if call is not None:
        if call.row_mask is not None:
            raise UnsupportedModelError(
                f"{_name(module)} mixes tokens outside attention, and a row backend (sdpa_masked) lays several prompts "
                "out in one row under a dense mask that only attention reads; use a varlen backend (backend='auto')"
            )
        lay = call.layout
        return Segments(lay.q_lengths, lay.k_lengths, lay.cu_seqlens_q, getattr(call, "states", None))
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return None
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
        raise UnsupportedModelError(f"{_name(module)}: cu_seq_lens_k differs from cu_seq_lens_q; a packed training batch has none")
    q = torch.diff(cu).cpu().numpy().astype(np.int64)
    return Segments(q, q, cu, None)


def run_segments(module, seg: Segments, args: tuple, kwargs: dict):
    """``module``'s own forward over a packed (1, T, D) stream, each segment as if alone: (1, T, D_out)."""
    name = _name(module)
    if len(args) > 1:
        raise UnsupportedModelError(f"{name} got {len(args)} positional arguments; prepack splits only hidden_states")
    rest = dict(kwargs)
    hidden = args[0] if args else rest.pop("hidden_states")
    B, T = hidden.shape[:2]
    if B != 1 or T != int(seg.q_lengths.sum()):
        raise UnsupportedModelError(f"{name} got a ({B}, {T}) stream for segments of {int(seg.q_lengths.sum())} tokens in one row")
    if rest.pop("attention_mask", None) is not None:
        raise UnsupportedModelError(f"{name} got a padding mask together with a packed layout; prepack cannot honour both")
    for key in CACHE_NAMES + LAYOUT_KWARGS:
        rest.pop(key, None)  # the call's cache holds attention's keys; a segment's state goes to its own cache
    # per-token tensors a mixer may be handed beside the stream (Mamba2Model passes position_ids on): cut per segment
    per_token = {k: rest.pop(k) for k in PER_TOKEN_KWARGS if isinstance(rest.get(k), torch.Tensor)}
    for key, value in per_token.items():
        if value.dim() != 2 or tuple(value.shape) != (1, T):
            raise UnsupportedModelError(f"{name} got {key} of shape {tuple(value.shape)}; prepack cuts a (1, {T}) one per segment")
    odd = sorted(k for k, v in rest.items() if isinstance(v, torch.Tensor))
    if odd:
        raise UnsupportedModelError(f"{name} got tensor keyword(s) {', '.join(odd)} that prepack cannot split per segment")
    continuing = np.flatnonzero(seg.k_lengths > seg.q_lengths)
    if len(continuing) and seg.states is None:
        j = int(continuing[0])
        raise UnsupportedModelError(
            f"{name} carries {' and '.join(kind_of(module).states)} state from token to token, and segment {j} of this "
            f"call continues {int(seg.k_lengths[j] - seg.q_lengths[j])} earlier tokens whose state the call does not hold: "
            "prepack cannot continue it exactly (shared prefixes and chunked prompts run whole for this model)"
        )
    forward = type(module).forward
    varlen = kind_of(module).varlen
    if seg.states is None and varlen is not None and varlen.ready(hidden.device):
        extra = varlen.kwargs(seg.cu_seqlens, seq_idx_of(seg.q_lengths, hidden.device))
        return forward(module, hidden, attention_mask=None, **rest, **per_token, **extra)
    cache_name = _cache_name(type(module))
    starts = np.concatenate([[0], np.cumsum(seg.q_lengths)[:-1]]).astype(np.int64)
    outs = {}
    if seg.states is not None and hasattr(seg.states, "gather"):  # the engine's held states: decode rows batched
        layer = mixer_layer_idx(module)
        for rows in _decode_groups(seg, layer):  # one-token segments that continue their states alike
            outs.update(_decode_together(module, forward, layer, cache_name, seg, rows, starts, hidden, per_token, rest))
    for j, n in enumerate(seg.q_lengths.tolist()):
        if n == 0 or j in outs:
            continue
        start = int(starts[j])
        cache = seg.states.cache_for(j) if seg.states is not None else None
        own = {} if cache is None else {cache_name: cache}
        own.update({k: v[:, start:start + n] for k, v in per_token.items()})
        outs[j] = forward(module, hidden[:, start:start + n], attention_mask=None, **own, **rest)
    return _concat([outs[j] for j in sorted(outs)], name, kind_of(module).returns_state)


def _decode_groups(seg: Segments, layer: int) -> list[list[int]]:
    """Groups of segments a step decodes in one batched call each: one token each, continuing held states alike."""
    states = seg.states
    rows = [j for j in np.flatnonzero(seg.q_lengths == 1).tolist() if states.continues(j)]
    return states.groups(rows, layer) if len(rows) > 1 else []


def _decode_together(module, forward, layer: int, cache_name: str, seg: Segments, rows: list[int], starts, hidden,
                     per_token: dict, rest: dict) -> dict:
    """``module``'s own forward once over the one-token segments ``rows``, batched as ``model.generate`` batches
    its decode steps: (n, 1, D) with layer ``layer``'s states stacked; their new states go back to each request's cache."""
    at = torch.from_numpy(starts[rows]).to(hidden.device)
    cache = seg.states.gather(rows, layer)
    own = {k: v[0, at][:, None] for k, v in per_token.items()}
    out = forward(module, hidden[0, at][:, None], attention_mask=None, **{cache_name: cache}, **own, **rest)
    seg.states.scatter(rows, layer, cache)
    first = out if isinstance(out, torch.Tensor) else out[0]
    return {j: (first[b : b + 1] if isinstance(out, torch.Tensor) else (first[b : b + 1],) + tuple(out[1:]))
            for b, j in enumerate(rows)}


def _concat(outs: list, name: str, returns_state: bool = False):
    """Per-segment outputs (a tensor, or a tuple whose other entries are None, or a state the caller drops when
    ``returns_state``) -> one along the token axis."""
    if all(isinstance(o, torch.Tensor) for o in outs):
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if returns_state and all(isinstance(o, tuple) and isinstance(o[0], torch.Tensor) for o in outs):
        return (torch.cat([o[0] for o in outs], dim=1),) + (None,) * (len(outs[0]) - 1)  # states: in each segment's cache
    if all(isinstance(o, tuple) and all(x is None for x in o[1:]) for o in outs):
        return (torch.cat([o[0] for o in outs], dim=1),) + outs[0][1:]
    raise UnsupportedModelError(f"{name} returned {type(outs[0]).__name__}; prepack joins tensors (or (tensor, None, ...)) only")


@functools.lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    found = [n for n in CACHE_NAMES if n in params]
    if not found:
        raise UnsupportedModelError(f"{cls.__name__}.forward takes no cache keyword ({', '.join(CACHE_NAMES)}); prepack cannot hand it a state")
    return found[0]


def _check_plain(module) -> None:
    """A mixer called without a packed layout inside a prepack entry point: its decoder layer dropped the layout."""
    from ..hf.registration import inside_entry_point

    if inside_entry_point():
        raise UnsupportedModelError(
            f"{_name(module)} ran without prepack's packed layout inside a prepack call: its decoder layer does not pass "
            "keyword arguments on to it, so prepack cannot keep the packed prompts apart"
        )


def _name(module) -> str:
    layer = getattr(module, "layer_idx", None)
    return type(module).__name__ + (f" (layer {layer})" if layer is not None else "")


def continuation_refusal(model) -> str | None:
    """Why ``model`` cannot continue earlier tokens (a shared prefix, a prompt's earlier chunk) without their state."""
    found = mixer_modules(model)
    if not found:
        return None
    path, module, kind = found[0]
    return (
        f"its {kind.name} layers ({path}: {type(module).__name__}) carry {' and '.join(kind.states)} state from token "
        "to token, which a segment continuing earlier tokens would need"
    )
