"""What :func:`prepack.generate` and :func:`prepack.generate_iter` give back: one :class:`Generation` per request.

One type in every mode, like vLLM's ``CompletionOutput``: the request's tokens, its text when a tokenizer
is known, its log-probabilities when asked for, and why it stopped. A call with ``num_return_sequences=G``
has ``N * G`` requests; each result says which prompt and which sample it is, so results read in
completion order (``generate_iter(order="completion")``) need nothing else.

Until the next release a :class:`Generation` also stands in for the bare token tensor that ``generate``
returned before (``torch.equal(result, ids)``, ``result.tolist()``, ``result[:3]``), each such use with a
``DeprecationWarning`` naming ``.tokens``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# prepack's finish reasons -> vLLM's (``CompletionOutput.finish_reason``): vLLM says "stop" for EOS and stop strings
VLLM_FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass(frozen=True, eq=False)
class Generation:
    """One request's result.

    Attributes:
        index: the request's number in the call, prompt-major (prompt ``i``'s sample ``g`` is ``i * G + g``,
            G = ``num_return_sequences``).
        prompt: the number of the prompt it continues (``index // G``).
        sample: which of its prompt's samples it is (``index % G``; 0 without ``num_return_sequences``).
        tokens: (n,) int64, the new tokens, ending at its EOS when it produced one.
        text: ``tokenizer.decode(tokens, skip_special_tokens=True)`` when the call had a tokenizer, else None.
        logprobs: (n,) float32 with ``return_logprobs=True``: ``log_softmax(logits / temperature)`` of each
            chosen token (the raw logits, before any processor; ``temperature`` 1 for greedy); else None.
        finish_reason: ``"eos"`` (it produced an EOS token), ``"length"`` (``max_new_tokens`` /
            ``max_length``) or ``"stop"`` (a stop string, ``max_time`` or the caller's stopping criteria).
            vLLM's reason is ``VLLM_FINISH_REASON[finish_reason]`` (``"stop"`` for EOS and stops, ``"length"``).
    """

    index: int
    prompt: int
    sample: int
    tokens: torch.Tensor
    text: str | None
    logprobs: torch.Tensor | None
    finish_reason: str

    # ---- for one release: the bare token tensor generate returned before (each use warns)

    def __getattr__(self, name: str):
        # called only for names a Generation lacks: tensor methods and attributes (tolist, shape, numel, ...)
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        _deprecated(f".{name}")
        return getattr(self.tokens, name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _deprecated(f"torch.{getattr(func, '__name__', func)}")
        return func(*_tokens_of(args), **{k: _tokens_of(v) for k, v in (kwargs or {}).items()})

    def __len__(self) -> int:
        self._as_tensor("len()")
        return len(self.tokens)

    def __getitem__(self, key):
        self._as_tensor("indexing")
        return self.tokens[key]

    def __array__(self, dtype=None, copy=None):
        _deprecated("numpy.asarray")
        return self.tokens.numpy() if dtype is None else self.tokens.numpy().astype(dtype)

    def __iter__(self):
        # never a tuple: before, return_logprobs gave a NamedTuple whose unpacking would now read tokens
        raise TypeError("a prepack.Generation is not iterable: read .tokens (a tensor), .text, .logprobs, .finish_reason")

    def _as_tensor(self, what: str) -> None:
        if self.logprobs is not None:  # before, return_logprobs gave a NamedTuple (index, tokens, logprobs, ...)
            raise TypeError(f"{what} of a prepack.Generation: read its fields (.tokens, .logprobs, .finish_reason)")
        _deprecated(what, stacklevel=4)


def _tokens_of(x):
    if isinstance(x, Generation):
        return x.tokens
    if isinstance(x, (list, tuple)):
        return type(x)(_tokens_of(v) for v in x)
    return x


def _deprecated(what: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"prepack.generate now returns prepack.Generation objects; {what} on one as on a token tensor is "
        "deprecated and will stop working in the next release: read .tokens",
        DeprecationWarning, stacklevel=stacklevel,
    )
