"""One step of the executor: a packed forward over what the scheduler chose, outputs at chosen rows.

Every job is a run of the same loop (:mod:`prepack.executor.scheduler` chooses what each unit feeds,
:mod:`prepack.executor.kvstore` holds the keys, this module runs the forward): ``generate``
(:mod:`prepack.jobs.engine`) keeps the logits of each segment's last token and samples from them;
prefill-only jobs (:mod:`prepack.jobs`: ``prefill``, ``forward_at``, ``score``, ``embed``, ...) keep
the outputs at the positions each request asks for and sample nothing. :func:`forward_step` is the
one model call both make::

    kv = store.plan(feeds)                                            # room for the new keys; stream order
    ids = concat(pending[u][:feeds[u]] for u in kv.order)             # (1, T)
    pos = ranges(offset + kv.cached, kv.q)                            # (1, T): each request's own positions
    out = model(ids, position_ids=pos, prepack=PackedCall(kv.layout, kernel, kv=kv),
                logits_to_keep=rows)                                  # (K, V), only at the rows asked for

A step whose every segment is a whole prompt that nothing will continue (no shared prefix, no
earlier chunk, no later one) needs no store: its segments attend to their own new keys
(``direct``), which is also the only layout of a row kernel (``sdpa_masked``: the step's prompts
packed by the planner into rows under dense block-diagonal masks, the prepacking paper's layout).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..planner import layout
from ..attention.cascade import cascade_kernel
from ..data.batch import pack_plan
from ..planner.bins import plan
from .call import PackedCall, StepLayout, carried_by
from ..hf.support import UnsupportedModelError
from ..hf.wrapped import unwrap


class Fed(NamedTuple):
    """What one forward fed.

    Attributes:
        units: the forward's units (requests, prefix regions) in stream order.
        q: (n,) int64, tokens each fed. cached: (n,) int64, keys each had in its own region before.
        start: (n,) int64, where each unit's first token sits in the forward's flattened (B * L) token grid.
        grid: (B, L), the forward's token grid (one row of T tokens for a varlen stream).
    """

    units: list
    q: np.ndarray
    cached: np.ndarray
    start: np.ndarray
    grid: tuple = (1, 0)


def forward_step(module, kernel, store, feeds: dict, units: dict, rows_of: Callable[[Fed], np.ndarray], *,
                 output: str = "logits", base=None, cache: dict | None = None, vision=None, samples: int = 1,
                 capacity: int | None = None, states=None, held=None) -> tuple[Fed, torch.Tensor]:
    """One packed forward: ``feeds[key]`` pending tokens of each unit ``units[key]``.

    Args:
        module: the model to call (:func:`prepack.hf.wrapped.runner` of it); ``base``: its decoder stack
            (:func:`prepack.hf.model.base_model`), called instead where no logits are wanted.
        store: the :class:`~prepack.executor.kvstore.KVStore`, or None for a direct step (every unit a whole
            prompt, nothing cached before or after; a row kernel's steps are always direct).
        rows_of: ``rows_of(fed) -> (K,) int64`` the grid rows whose outputs to return.
        output: ``"logits"`` (the LM head at those rows only) or ``"hidden_states"`` (the decoder's last hidden state).
        cache: a ``{"kwarg": name, "cache": recording cache}`` to record what the model caches, or None.
        vision: the prompts' images (:class:`prepack.hf.vision.VisionPrompts`), unit ``u`` being prompt
            ``u.index // samples``; or None.
        capacity: a row kernel's row length.
        states: for a model with token mixers outside attention (:mod:`prepack.mixers`), where each segment's
            conv / recurrent state goes (a :class:`prepack.mixers.MixerStates`), or None.
        held: instead of ``states``, in a stored step: the mixer states the units keep across steps
            (:class:`prepack.mixers.states.HeldStates`, the decode engine's).

    Returns:
        ``(fed, values)``: :class:`Fed`, and (K, X) the outputs at ``rows_of(fed)``.
    """
    device = store.device if store is not None else _device(module)
    kw: dict = {"use_cache": False}
    if cache is not None:
        kw.update({"use_cache": True, cache["kwarg"]: cache["cache"]})
    if store is None:
        fed, ids, pos, call = _direct(kernel, feeds, units, device, capacity, states)
    else:
        kv = store.plan(feeds)
        order = [units[k] for k in kv.order]
        q = np.asarray(kv.q, np.int64)
        fed = Fed(order, q, np.asarray(kv.cached, np.int64), layout.starts(q), (1, int(q.sum())))
        ids = torch.from_numpy(np.concatenate([u.pending[:n] for u, n in zip(order, q)]))[None].to(device)
        offset = np.array([u.offset for u in order], np.int64)  # a sharer's own keys follow its prefix regions'
        pos = torch.from_numpy(layout.ranges(offset + fed.cached, q))[None].to(device)
        step_kernel = kernel if kv.parts is None else cascade_kernel(kernel, kv.parts, kv.base_layout)
        if held is not None:
            states = held.for_step([u.key for u in order], kv.layout.q_lengths)
        call = PackedCall(kv.layout, step_kernel, kv=kv, states=states)
    if vision is not None:
        prompts = np.array([u.index // samples for u in fed.units], np.int64)
        pos, images = vision.forward_inputs(module, prompts, fed.q, np.array([u.offset for u in fed.units]) + fed.cached, pos)
        kw.update(images)
    at = rows_of(fed)
    first = store is not None and not store.pools
    with torch.no_grad(), carried_by(call, pos):  # for layers that drop prepack= but pass position_ids on
        values = _outputs(module, base, ids, pos, call, at, output, kw)
    if first:
        check_every_layer(module, store)
    return fed, values


def _device(module) -> torch.device:
    return next(unwrap(module).parameters()).device


def _direct(kernel, feeds: dict, units: dict, device, capacity: int | None, states=None):
    """A step of whole prompts that attend to their own new keys only: a varlen stream, or rows of ``capacity``."""
    order = [units[k] for k in feeds]
    q = np.array([feeds[k] for k in feeds], np.int64)
    zero = np.zeros(len(q), np.int64)
    if not kernel.rows:
        ids = torch.from_numpy(np.concatenate([u.pending[:n] for u, n in zip(order, q)]))[None].to(device)
        pos = torch.from_numpy(layout.ranges(zero, q))[None].to(device)
        call = PackedCall(StepLayout(q, q, device), kernel, states=states)
        return Fed(order, q, zero, layout.starts(q), (1, int(q.sum()))), ids, pos, call
    batch = pack_plan(plan(q, capacity), [u.pending[:n] for u, n in zip(order, q)])
    seg = batch.segments()
    start = np.empty(len(q), np.int64)
    start[seg.order] = seg.grid_start
    row_mask = functools.lru_cache(maxsize=None)(
        lambda window, chunk: batch.attention_mask("bool", window=window, chunk=chunk).to(device)
    )
    call = PackedCall(StepLayout(seg.lengths, seg.lengths, device), kernel, row_mask=row_mask, states=states)
    fed = Fed(order, q, zero, start, tuple(batch.input_ids.shape))
    return fed, batch.input_ids.to(device), batch.position_ids.to(device), call


def _outputs(module, base, ids, pos, call, at: np.ndarray, output: str, kw: dict) -> torch.Tensor:
    """(K, X) outputs at grid rows ``at``: the LM head there only, or the decoder's hidden states there."""
    width = ids.shape[1]
    if output == "logits" and len(at):
        # the LM head (and any final soft-capping) runs at the kept columns only
        keep, col = np.unique(at % width, return_inverse=True)
        out = module(input_ids=ids, position_ids=pos, prepack=call, logits_to_keep=torch.from_numpy(keep).to(ids.device), **kw).logits
        return out.reshape(-1, out.shape[-1])[torch.from_numpy(at // width * len(keep) + col).to(ids.device)]
    hidden = base(input_ids=ids, position_ids=pos, prepack=call, **kw).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(at).to(ids.device)]


def check_every_layer(module, store) -> None:
    """After the first stored step: every layer's attention went through prepack's (the store holds one pool per such layer)."""
    layers = unwrap(module).config.get_text_config(decoder=True).num_hidden_layers
    missing = sorted(set(range(layers)) - set(store.pools) - set(store.reads) - store.keyless)  # readers read their source's pool
    if missing and store.revisits and len(store.pools) >= layers:
        missing = []  # a model that revisits layer indices (HRM's cycles): one stream per call, as many as its cache has
    if missing:
        raise UnsupportedModelError(
            f"{type(unwrap(module)).__name__}: layers {missing} of {layers} did not go through prepack's attention, so "
            "their keys cannot be held for later tokens; prepack cannot run this model exactly in pieces"
        )


def rope_groups(feeds: dict, units: dict, rope, name: str) -> list[dict]:
    """``feeds`` split so that each forward gets one set of rotary frequencies (one group without ``rope``).

    With length-dependent RoPE (:mod:`prepack.hf.rope`) a request alone reaches ``len(prompt) + len(tokens)``
    positions at this step, and its frequencies follow that length: requests whose lengths give the same
    frequencies share a forward (such a model's units are whole requests: they share no prefix region).
    """
    if rope is None:
        return [feeds]
    groups: dict = {}
    for key, n in feeds.items():
        r = units[key]
        reach = len(r.prompt) + len(r.tokens)
        why = rope.refusal(reach)
        if why:
            raise UnsupportedModelError(f"request {r.index} reaches {reach} positions but {name}'s {why}")
        groups.setdefault(rope.key(reach), {})[key] = n
    return list(groups.values())
