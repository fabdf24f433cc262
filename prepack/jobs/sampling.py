"""Token choice for many requests at once, bit for bit what each request's processors and its generator give it alone.

Two pieces of :func:`prepack.jobs.engine`'s step, both per-row arithmetic done for all rows at once:

* :func:`warp_rows`: transformers' temperature, top-k, top-p and min-p warpers with per-row settings ((m,)
  tensors), in the order each row's own list applies them, equal bit for bit to calling each row's list on
  that row alone. Rows whose outcome depends on an order the values do not fix (ties across a top-p cut or
  across min-p's ``min_tokens_to_keep``), and rows holding NaN, are handed to their own warpers.
* :func:`draw`: ``torch.multinomial(probs[j:j+1], 1, generator=g_j)`` for every row: each request's own draw,
  what ``model.generate`` draws for that prompt alone (torch's own kernel; no copy of its algorithm).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

# generate's order of the row-wise warpers (GenerationMixin._get_logits_processor)
ORDER = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")


@functools.lru_cache(maxsize=1)
def _warper_types() -> dict:
    from transformers.generation import logits_process as lp

    return {getattr(lp, name): name for name in ORDER}


def row_wise_steps(processors) -> tuple | None:
    """The steps :func:`warp_rows` takes for a processor list that holds only transformers' temperature, top-k,
    top-p and min-p warpers (each row of the scores changed on its own, the ids unread): :data:`ORDER` when the
    list is in generate's order (each kind at most once), else the list's own sequence of kinds; None for any
    other list (or a warper whose settings are tensors)."""
    kinds, types = [], _warper_types()
    for p in processors:
        name = types.get(type(p))
        if name is None or any(isinstance(v, torch.Tensor) for v in vars(p).values()):
            return None
        kinds.append(name)
    where = [ORDER.index(k) for k in kinds]
    return ORDER if all(a < b for a, b in zip(where, where[1:])) else tuple(kinds)


def warp_rows(scores: torch.Tensor, lists: list, steps: tuple) -> torch.Tensor:
    """Each row's warpers on its row of ``scores``, all rows at once.

    Args:
        scores: (m, V) float scores, one row per request (not written to).
        lists: m processor lists, each accepted by :func:`row_wise_steps` with result ``steps``.
        steps: the kinds applied, in order; a row whose list lacks a kind skips that step.

    Returns:
        (m, V) scores equal to ``lists[j](ids, scores[j:j+1])`` for every row j.
    """
    per_row = [_by_step(lst, steps) for lst in lists]
    out = scores  # every step returns a new tensor: the caller's scores are never written
    for s, kind in enumerate(steps):
        have = [(j, w[s]) for j, w in enumerate(per_row) if s in w]
        if len(have) == len(per_row):
            out = _STEPS[kind](out, [w for _, w in have])
        elif have:
            rows = torch.tensor([j for j, _ in have], dtype=torch.long, device=scores.device)
            out = out.index_copy(0, rows, _STEPS[kind](out.index_select(0, rows), [w for _, w in have]))
    return out


def _by_step(processors, steps: tuple) -> dict:
    """{step index: warper} of one row's list."""
    if steps is ORDER:
        types = _warper_types()
        return {ORDER.index(types[type(p)]): p for p in processors}
    return dict(enumerate(processors))


def _settings(warpers: list, name: str, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(m, 1) one setting of each row's warper (floats as float32: the warpers' Python floats meet float32
    scores as float32 scalars)."""
    return torch.tensor([float(getattr(w, name)) if dtype.is_floating_point else int(getattr(w, name)) for w in warpers],
                        dtype=dtype, device=like.device)[:, None]


def _filled(scores: torch.Tensor, remove: torch.Tensor, warpers: list) -> torch.Tensor:
    """``scores`` with ``remove`` set to each row's ``filter_value`` (the warper's ``masked_fill``)."""
    return torch.where(remove, _settings(warpers, "filter_value", scores).to(scores.dtype), scores)


def _temperature(scores: torch.Tensor, warpers: list) -> torch.Tensor:
    return scores / _settings(warpers, "temperature", scores).to(scores.dtype)


def _top_k(scores: torch.Tensor, warpers: list) -> torch.Tensor:
    """``scores < topk(scores, k).values[..., -1]`` removed: the k-th largest value is the same in a longer top-k."""
    k = _settings(warpers, "top_k", scores, torch.long).clamp(max=scores.shape[-1])  # the warper's min(top_k, V)
    kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(1, k - 1)
    return _filled(scores, scores < kth, warpers)


def _top_p(scores: torch.Tensor, warpers: list) -> torch.Tensor:
    """TopPLogitsWarper per row without its (m, V) index sort (see ``prepack.jobs.decoding.top_p_warp``, here with
    per-row ``top_p``, ``min_tokens_to_keep`` and ``filter_value``). The softmax and cumulative sum of the sorted
    values are torch's own (their rounding is the warper's); comparisons and counts, exact in any library, are
    numpy's (single-threaded: no waiting on torch's second thread for a cheap pass)."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        return _each(scores, warpers)
    x = scores.numpy()
    if np.isnan(x).any():
        return _each(scores, warpers)
    vocab = x.shape[1]
    values = _sorted_values(x)  # (m, V) ascending: torch.sort's values
    cumulative = torch.from_numpy(values).softmax(dim=-1).cumsum(dim=-1).numpy()
    # the warper compares with the Python float 1 - top_p, which torch casts to float32
    bound = np.array([1 - w.top_p for w in warpers], np.float32)[:, None]
    keep = np.array([w.min_tokens_to_keep for w in warpers])
    cut = np.minimum(np.count_nonzero(cumulative <= bound, axis=-1), vocab - keep)  # (m,) sorted positions removed
    last = np.take_along_axis(values, np.maximum(cut - 1, 0)[:, None], 1)  # (m, 1) the largest removed value
    remove = (x <= last) & (cut > 0)[:, None]
    fill = np.array([w.filter_value for w in warpers], np.float32)[:, None]
    out = torch.from_numpy(np.where(remove, fill, x))
    tied = np.flatnonzero((np.count_nonzero(remove, axis=-1) != cut) & (cut > 0)).tolist()
    for j in tied:  # the cut splits tied values: torch.sort's order among them decides, as in the warper alone
        out[j] = _each(scores[j : j + 1], [warpers[j]])[0]
    return out


def _sorted_values(x: np.ndarray) -> np.ndarray:
    """(m, V) each row's values ascending (no indices), the rows split over two threads (numpy's sort frees the GIL)."""
    if len(x) < 8 or torch.get_num_threads() < 2:
        return np.sort(x, axis=-1)
    out = np.empty_like(x)
    half = slice(len(x) // 2, None)
    later = _pool(os.getpid()).submit(_sort_into, out, x, half)
    _sort_into(out, x, slice(0, len(x) // 2))
    later.result()
    return out


def _sort_into(out: np.ndarray, x: np.ndarray, rows: slice) -> None:
    out[rows] = np.sort(x[rows], axis=-1)


@functools.lru_cache(maxsize=1)
def _pool(pid: int):
    """One sorting thread per process (keyed by pid: a forked child has no thread of its parent's pool)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepack-sort")


def _min_p(scores: torch.Tensor, warpers: list) -> torch.Tensor:
    """MinPLogitsWarper per row. Its ``topk(probs, min_tokens_to_keep)`` keeps some tokens below the threshold; which
    ones is fixed by value except for ties at the k-th probability below the threshold: those rows (and NaN rows)
    go through their own warper."""
    probs = torch.softmax(scores, dim=-1)
    bound = _settings(warpers, "min_p", scores).to(probs.dtype) * probs.amax(dim=-1, keepdim=True)
    remove = probs < bound
    keep = _settings(warpers, "min_tokens_to_keep", scores, torch.long).clamp(max=scores.shape[-1])
    alone = torch.isnan(probs).any(-1)
    if bool((keep > 1).any()):  # the k-th largest probability: larger ones are kept, equal ones may be split
        kth = torch.topk(probs, int(keep.max()), dim=-1).values.gather(1, keep - 1)
        remove &= probs < kth
        alone |= (((probs >= kth).sum(-1, keepdim=True) > keep) & (kth < bound))[:, 0]
    out = _filled(scores, remove, warpers)
    for j in alone.nonzero()[:, 0].tolist():
        out[j] = _each(scores[j : j + 1], [warpers[j]])[0]
    return out


def _each(scores: torch.Tensor, warpers: list) -> torch.Tensor:
    """Each row through its own warper (the reference path)."""
    ids = scores.new_zeros(1, 0, dtype=torch.long)
    return torch.cat([w(ids, scores[j : j + 1]) for j, w in enumerate(warpers)])


_STEPS = dict(zip(ORDER, (_temperature, _top_k, _top_p, _min_p)))


def draw(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One token per row, ``torch.multinomial(probs[j:j+1], 1, generator=generators[j])`` for each: the generators
    advance exactly as each request's own ``model.generate`` advances its generator.

    Args:
        probs: (m, V) float32 probabilities (softmax of the processed scores).
        generators: m ``torch.Generator``, one per row.

    Returns:
        (m,) int64 tokens, on ``probs``' device.
    """
    return torch.cat([torch.multinomial(probs[j : j + 1], 1, generator=g)[0] for j, g in enumerate(generators)])
