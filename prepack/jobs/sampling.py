"""Token choice for many requests at once, bit for bit what each request's processors and its generator give it alone.

Two pieces of :func:`prepack.jobs.engine`'s step, both per-row arithmetic done for all rows at once:

* :func:`warp_rows`: transformers' temperature, top-k, top-p and min-p warpers with per-row settings ((m,)
  tensors), in the order each row's own list applies them, equal bit for bit to calling each row's list on
  that row alone. Rows whose outcome depends on an order the values do not fix (ties across a top-p cut or
  across min-p's ``min_tokens_to_keep``), and rows holding NaN, are handed to their own warpers.
* :func:`draw`: ``torch.multinomial(probs[j:j+1], 1, generator=g_j)`` for every row, consuming each generator
  exactly as that call does. On CPU, ``torch.multinomial`` with one sample is the first ``argmax(p / q)`` with
  ``q = exponential_()`` over the whole row: one ``random64()`` (two Mersenne-twister words) and one glibc
  ``log1p`` per vocabulary entry, in torch's serial kernel (about 20 ns an entry). :func:`draw` produces the
  same words with numpy's MT19937 from the generator's own state (about 5 ns an entry), writes the advanced
  state back, and ranks only the entries with ``p > 0`` (the others' ratios are 0 whatever ``q`` is),
  recomputing the few that can win exactly as torch does. Where the words cannot settle it (a uniform of
  exactly 0) the row goes to ``torch.multinomial``. A one-time check against ``torch.multinomial``
  (:func:`replica_ok`: consecutive draws, the same tokens and generator states) decides whether this torch
  and numpy draw that way (torch's ``CPUGeneratorImplState`` layout, numpy's MT19937 state struct); if not,
  and for CUDA generators, every row calls ``torch.multinomial`` itself.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

import numpy as np
import torch

# generate's order of the row-wise warpers (GenerationMixin._get_logits_processor)
ORDER = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")
_MASK21 = np.uint64((1 << 21) - 1)  # the first word's bits in random64()'s low 53
_STATE_BYTES = 5056  # CPUGeneratorImplState: legacy THGeneratorState (seed, left, seeded, next, state[624], normal) + float normal
_LEFT, _NEXT, _KEY = 8, 16, 24  # byte offsets of left (int32), next (uint64) and state[624] (uint64 each)


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
    """One token per row, ``torch.multinomial(probs[j:j+1], 1, generator=generators[j])`` for each, the generators
    left as those calls leave them.

    Args:
        probs: (m, V) float32 probabilities (softmax of the processed scores).
        generators: m ``torch.Generator``, one per row.

    Returns:
        (m,) int64 tokens, on ``probs``' device.
    """
    tokens = [None] * len(probs)
    if probs.device.type == "cpu" and probs.dtype == torch.float32 and replica_ok():
        p, mt = probs.numpy(), np.random.MT19937(0)
        # rows torch would refuse (inf, NaN, negative, all 0) go to torch.multinomial, which raises as alone
        valid = (np.isfinite(p).all(-1) & (p.min(-1) >= 0)).tolist()
        for j, g in enumerate(generators):
            kept = np.flatnonzero(p[j]) if valid[j] and g.device.type == "cpu" else ()
            if len(kept):
                tokens[j] = _replica(p[j], kept, g, mt)
    out = torch.tensor([-1 if t is None else t for t in tokens], dtype=torch.long)
    for j, t in enumerate(tokens):
        if t is None:
            out[j] = torch.multinomial(probs[j : j + 1], 1, generator=generators[j])[0, 0]
    return out.to(probs.device)


def _replica(p: np.ndarray, kept: np.ndarray, g: torch.Generator, mt: np.random.MT19937) -> int | None:
    """``torch.multinomial(p[None], 1, generator=g)`` for one valid (V,) float32 row whose entries ``kept`` are > 0,
    g advanced alike (``mt`` is scratch); None, g untouched, where the replica is not sure: a uniform of 0 (torch's
    q would be 0, its ratio inf or NaN) or every kept ratio 0.

    torch's token is the first argmax of ``fl32(p / q)``, ``q = fl32(-log1p(-u))`` (glibc's double ``log1p``).
    numpy's ``log1p`` (within a few ulps of a double) ranks the kept ratios; only those within 1e-6 of the
    largest can be torch's argmax (fl32 rounding moves a ratio by < 2.4e-7), and those are recomputed exactly
    with ``math.log1p`` (glibc's) and float32 arithmetic.
    """
    state = g.get_state().numpy()
    left = int(state[_LEFT : _LEFT + 4].view(np.int32)[0])
    if len(state) != _STATE_BYTES or not 1 <= left <= 625:
        return None
    _put_mt(mt, state[_KEY : _KEY + 624 * 8].view(np.uint64).astype(np.uint32), 625 - left)
    words = np.random.Generator(mt).integers(0, 1 << 32, size=2 * len(p), dtype=np.uint32)  # one MT word each
    if not words[1::2].all() and not _no_zero_uniform(words):
        return None
    pairs = words.view(np.uint64)[kept]  # entry i's random64() = (words[2i] << 32) | words[2i + 1]; here LE halves
    r = ((pairs & _MASK21) << np.uint64(32)) | (pairs >> np.uint64(32))  # its 53 low bits: the uniform's mantissa
    u = r.astype(np.float64) * (1.0 / (1 << 53))
    approx = p[kept] / -np.log1p(-u)
    near = np.flatnonzero(approx >= approx.max() * (1 - 1e-6))
    exact = [np.float32(p[kept[i]]) / np.float32(-math.log1p(-float(u[i]))) for i in near]
    best = int(near[int(np.argmax(exact))])  # the first largest, as torch's argmax; entries with p = 0 have ratio 0
    if not exact[int(np.argmax(exact))] > 0:
        return None
    key, pos = _get_mt(mt)
    after = state.copy()
    after[_LEFT : _LEFT + 4] = np.array([625 - pos], np.int32).view(np.uint8)
    after[_NEXT : _NEXT + 8] = np.array([pos], np.uint64).view(np.uint8)
    after[_KEY : _KEY + 624 * 8] = key.astype(np.uint64).view(np.uint8)
    g.set_state(torch.from_numpy(after))
    return int(kept[best])


def _no_zero_uniform(words: np.ndarray) -> bool:
    """Whether no entry's 53-bit uniform is 0 (its second word 0 and the first word's low 21 bits 0)."""
    return not bool(((words[1::2] == 0) & (words[0::2] & np.uint32((1 << 21) - 1) == 0)).any())


def _put_mt(mt: np.random.MT19937, key: np.ndarray, pos: int) -> None:
    """Set numpy's MT19937 state (its C struct: uint32 key[624], int pos, at ``ctypes.state_address``; the
    ``state`` property copies word by word)."""
    address = mt.ctypes.state_address
    ctypes.memmove(address, key.ctypes.data, 624 * 4)
    ctypes.c_int.from_address(address + 624 * 4).value = pos


def _get_mt(mt: np.random.MT19937) -> tuple[np.ndarray, int]:
    address = mt.ctypes.state_address
    key = np.ctypeslib.as_array((ctypes.c_uint32 * 624).from_address(address)).copy()
    return key, ctypes.c_int.from_address(address + 624 * 4).value


@functools.lru_cache(maxsize=1)
def replica_ok() -> bool:
    """Whether :func:`_replica` draws what ``torch.multinomial`` draws in this torch build: three consecutive draws
    from one generator, on rows with zeros, the same tokens and the same generator state after each."""
    probe = np.random.MT19937(0)  # numpy's state struct read back as the documented property sets it, before any write
    key = np.arange(624, dtype=np.uint32) * np.uint32(2654435761)
    probe.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 17}}
    got, pos = _get_mt(probe)
    if pos != 17 or not np.array_equal(got, key):
        return False
    gen = torch.Generator().manual_seed(12345)
    x = torch.randn(3, 4001, generator=gen)
    x[:, ::3] = -float("inf")
    probs = torch.softmax(x, -1)
    mine, theirs, mt = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7), np.random.MT19937(0)
    for row in probs:
        want = int(torch.multinomial(row[None], 1, generator=theirs))
        got = _replica(row.numpy(), np.flatnonzero(row.numpy()), mine, mt)
        if got != want or not torch.equal(mine.get_state(), theirs.get_state()):
            return False
    return True
