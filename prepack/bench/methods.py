"""The methods the benchmark compares, by name, and the token slots each one computes.

Names:

* ``padded``: one left-padded batch through the model (transformers' usual path);
* ``sorted``: the prompts sorted by length, in left-padded micro-batches of ``micro_batch``;
* ``prepack``: :func:`prepack.prefill` / :func:`prepack.generate` with ``backend="auto"``;
* ``prepack:<backend>``: the same with one backend of :data:`prepack.BACKENDS`, e.g.
  ``prepack:sdpa_masked`` (the prepacking paper's rows with a dense block-diagonal mask)
  or ``prepack:reference``;
* ``hf-packed-nocache``: rows packed by prepack's planner, positions restarting per
  prompt, no KV cache: transformers builds the mask (as with ``DataCollatorWithFlattening``);
* ``hf-cb``: transformers' continuous batching (``generate_batch``, paged KV cache).

Every method is a function ``(model, call) -> Outcome``: the first new token of
every request, the output (kept alive until the call is timed, so that a cache
is really built), and the attention backend that ran.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..attention.registry import BACKENDS
from ..jobs.generation import generate_with_backends, left_pad
from ..hf.registration import cache_kwarg, wrapped_implementation
from ..hf.model import ROW_BACKENDS

METRICS = ("prefill", "ttft", "generate")
PREPACK_PREFIX = "prepack:"
# The named methods; any "prepack:<backend>" is one too (see method_fn).
METHODS = ("padded", "sorted", "prepack:sdpa_masked", "prepack", "hf-packed-nocache", "hf-cb")
DEFAULT_METHODS = ("padded", "sorted", "prepack:sdpa_masked", "prepack")
SORTED_MICRO_BATCH = 8

# Which metrics each method can run. hf-packed-nocache keeps no cache, so it cannot
# decode; continuous batching has no separate prefill entry point.
SUPPORTS = {
    "padded": METRICS,
    "sorted": METRICS,
    "prepack": METRICS,
    "hf-packed-nocache": ("prefill",),
    "hf-cb": ("ttft", "generate"),
    # prepack's decode engine runs varlen backends only: the row layout prefills, it does not decode
    "prepack:sdpa_masked": ("prefill", "ttft"),
}


class Outcome(NamedTuple):
    """What one method call gives back.

    Attributes:
        first: (N,) int64, the first new token of every request.
        output: the caches or generated tokens (None when there is nothing to keep).
        backend: the attention that ran, e.g. ``"sdpa_varlen"`` or the model's ``"sdpa"``.
        tokens_run: the prompt tokens the prefill ran, where the method knows (prepack's prefill: fewer
            than the prompts hold when they share a prefix); None: :func:`computed_tokens` counts them.
    """

    first: torch.Tensor
    output: object
    backend: str
    tokens_run: int | None = None


@dataclass(frozen=True)
class Call:
    """What one method call needs besides the model: the prompts and the decoding setup."""

    prompts: tuple
    metric: str
    new_tokens: int
    pad_id: int
    micro_batch: int = SORTED_MICRO_BATCH

    @property
    def max_new_tokens(self) -> int:
        return 1 if self.metric == "ttft" else self.new_tokens


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _hf_attention(model) -> str:
    """The implementation a plain call runs: a prepack wrapper runs the one it wraps for unpacked calls."""
    name = getattr(model.config, "_attn_implementation", None) or "eager"
    return wrapped_implementation(name) or name


def _generation_config(model, c: Call):
    from transformers import GenerationConfig

    # A fresh config per call: generate_batch rewrites fields of the one it gets.
    kwargs = dict(max_new_tokens=c.max_new_tokens, do_sample=False, pad_token_id=c.pad_id)
    eos = model.generation_config.eos_token_id
    if eos is not None:  # a real checkpoint: forbid EOS so every method decodes the same number of tokens
        kwargs.update(eos_token_id=eos, min_new_tokens=c.max_new_tokens)
    return GenerationConfig(**kwargs)


def _padded_prefill(model, prompts, pad_id) -> tuple[torch.Tensor, object]:
    ids, mask = left_pad(prompts, pad_id, model_device(model))
    # generate() derives positions from the mask; a plain forward must be told, or
    # left-padded rows would start at position L_max - len instead of 0.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    # the output names its cache as forward does (``cache`` in transformers 5, where
    # ``past_key_values`` is a deprecated alias that logs a warning)
    return out.logits[:, -1].argmax(-1), getattr(out, cache_kwarg(model))


def _padded_generate(model, prompts, c: Call) -> torch.Tensor:
    ids, mask = left_pad(prompts, c.pad_id, model_device(model))
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_generation_config(model, c))
    return out[:, ids.shape[1]:]


def _sorted_chunks(prompts, size: int) -> list[np.ndarray]:
    order = np.argsort([len(p) for p in prompts], kind="stable")
    return [order[i: i + size] for i in range(0, len(order), size)]


def m_padded(model, c: Call) -> Outcome:
    if c.metric == "prefill":
        return Outcome(*_padded_prefill(model, c.prompts, c.pad_id), _hf_attention(model))
    new = _padded_generate(model, c.prompts, c)
    return Outcome(new[:, 0], new, _hf_attention(model))


def m_sorted(model, c: Call) -> Outcome:
    first = torch.empty(len(c.prompts), dtype=torch.long)
    keep = []
    for idx in _sorted_chunks(c.prompts, c.micro_batch):
        chunk = [c.prompts[i] for i in idx]
        if c.metric == "prefill":
            tok, cache = _padded_prefill(model, chunk, c.pad_id)
            keep.append(cache)
        else:
            new = _padded_generate(model, chunk, c)
            tok = new[:, 0]
            keep.append((idx, new))
        first[torch.from_numpy(idx)] = tok.cpu()
    return Outcome(first, keep, _hf_attention(model))


def _m_prepack(backend: str) -> Callable[..., Outcome]:
    def run(model, c: Call) -> Outcome:
        import prepack

        if c.metric == "prefill":
            r = prepack.prefill(model, c.prompts, backend=backend)
            # Counted in the time: the scatter into the left-padded cache that
            # model.generate continues from, so the result is as usable as padded's.
            cache = r.left_padded_cache()
            return Outcome(r.logits.argmax(-1), cache, r.backend, r.tokens_run)
        if backend in ROW_BACKENDS:  # rows under dense masks prefill only: the first token is the prefill's (greedy)
            r = prepack.prefill(model, c.prompts, backend=backend)
            first = r.logits.argmax(-1)
            return Outcome(first, [t[None] for t in first], r.backend)
        out = generate_with_backends(
            model, c.prompts, backend=backend, generation_config=_generation_config(model, c), progress=False,
        )
        new = [g.tokens for g in out.results]
        ran = ", ".join(out.backends)  # the kernel the decode engine ran
        return Outcome(torch.stack([t[0] for t in new]), new, ran)

    return run


def m_hf_packed_nocache(model, c: Call) -> Outcome:
    """Rows packed as ``DataCollatorWithFlattening`` would, positions restarting; transformers builds the mask."""
    from ..data.batch import pack

    batch = pack([np.asarray(p) for p in c.prompts], algorithm="bfd", pad_id=c.pad_id)
    p = batch.plan
    ends = p.offset + p.lengths - 1
    keep, where = np.unique(ends, return_inverse=True)
    dev = model_device(model)
    out = model(
        input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev), use_cache=False,
        logits_to_keep=torch.from_numpy(keep).to(dev),
    )
    logits = out.logits[torch.from_numpy(p.row).to(dev), torch.from_numpy(where).to(dev)]
    return Outcome(logits.argmax(-1), None, _hf_attention(model))


def m_hf_cb(model, c: Call) -> Outcome:
    """transformers' continuous batching (``generate_batch``, paged KV cache)."""
    key = (id(model), tuple(len(p) for p in c.prompts), c.max_new_tokens)
    if key not in _CB_CONFIGS:  # sized once per workload (the warm-up round): its probes are not its time
        _CB_CONFIGS[key] = cb_config(model, c.prompts, c.max_new_tokens)
    new = generate_batch(model, c.prompts, _generation_config(model, c), c.max_new_tokens, config=_CB_CONFIGS[key])
    return Outcome(torch.stack([t[0] for t in new]), new, f"{_hf_attention(model)} (paged)")


_CB_CONFIGS: dict[tuple, object] = {}  # (model id, prompt lengths, max_new_tokens) -> cb_config's answer


def generate_batch(model, prompts: Sequence, generation_config, max_new_tokens: int, *, config=None, progress_bar: bool = True) -> list[torch.Tensor]:
    """transformers' ``generate_batch`` on ``prompts``, sized generously to the workload; each request's new tokens.

    Left to itself on CPU it sizes the paged cache from system memory (GBs, zero-filled on every call)
    and prefills in small slices. Here the cache holds every request whole (prompt + ``max_new_tokens``)
    and a forward takes every prompt token at once, or, where transformers refuses that footprint (its
    attention masks are (M, cache + M) per forward), the largest share of them, halving, that it accepts
    (:func:`cb_config`). It keeps the model's attention implementation, as padded and sorted do, so the
    backend column says what ran (it would otherwise switch to flash where installed). A request
    that fails inside generate_batch (it logs, and returns the others) raises here. ``config``: a
    :func:`cb_config` made earlier (its probes then stay out of a timed call).
    """
    config = cb_config(model, prompts, max_new_tokens) if config is None else config
    out = model.generate_batch(inputs=[list(p) for p in prompts], generation_config=generation_config,
                               continuous_batching_config=config, warmup=False, progress_bar=progress_bar)
    failed = [i for i in range(len(prompts)) if f"req_{i}" not in out or out[f"req_{i}"].error]
    if failed:
        raise RuntimeError(f"generate_batch failed requests {failed[:8]}{'...' if len(failed) > 8 else ''} (see its log)")
    return [torch.tensor(out[f"req_{i}"].generated_tokens) for i in range(len(prompts))]


def cb_config(model, prompts: Sequence, max_new_tokens: int):
    """The ``ContinuousBatchingConfig`` :func:`generate_batch` runs with: a paged cache holding every request
    whole, up to every prompt token per forward, halved until transformers accepts its memory footprint
    (tried on a one-token request: transformers refuses an oversized cache only in its generation loop)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    tokens = sum(len(p) for p in prompts)
    pages = sum(-(-(len(p) + max_new_tokens) // page) for p in prompts) + 1
    log = logging.getLogger("ContinuousBatchingLogger")  # a refused size is expected here: keep its traceback out
    while True:
        config = ContinuousBatchingConfig(
            page_size=page, num_blocks=pages, max_batch_tokens=tokens, max_requests_per_batch=len(prompts),
            auto_switch_to_flash=False,
        )
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            probe = model.generate_batch(inputs=[[1]], generation_config=GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=-1),
                                         continuous_batching_config=config, warmup=False, progress_bar=False)
        finally:
            log.setLevel(level)
        if "req_0" in probe and not probe["req_0"].error:
            return config
        if tokens == 1:
            raise RuntimeError("generate_batch refuses even one token per forward on this machine")
        tokens = max(1, tokens // 2)


METHOD_FNS: dict[str, Callable[..., Outcome]] = {
    "padded": m_padded,
    "sorted": m_sorted,
    "prepack": _m_prepack("auto"),
    "hf-packed-nocache": m_hf_packed_nocache,
    "hf-cb": m_hf_cb,
}


def _backend_of(method: str) -> str | None:
    """``"sdpa_masked"`` for ``"prepack:sdpa_masked"``; None for a method that is not ``prepack:<backend>``."""
    return method.removeprefix(PREPACK_PREFIX) if method.startswith(PREPACK_PREFIX) else None


def check_method(method: str) -> str:
    """Return ``method`` if it names a method, else raise ValueError listing the choices."""
    if method in METHOD_FNS or _backend_of(method) in BACKENDS:
        return method
    raise ValueError(
        f"unknown method {method!r}; choose {', '.join(METHOD_FNS)} or prepack:<backend> "
        f"with <backend> one of {', '.join(BACKENDS)}"
    )


def method_fn(method: str) -> Callable[..., Outcome]:
    """The function that runs ``method`` (see the module docstring for the names)."""
    if method in METHOD_FNS:  # looked up per call, so a test can swap one in
        return METHOD_FNS[method]
    return _m_prepack(_backend_of(check_method(method)))


def supports(method: str, metric: str) -> bool:
    """Whether ``method`` can run ``metric`` (every other ``prepack:<backend>`` runs all three)."""
    return metric in SUPPORTS.get(method, METRICS if _backend_of(method) else ())


def computed_tokens(method: str, lengths: Sequence[int], micro_batch: int = SORTED_MICRO_BATCH) -> int:
    """Token slots a method's prefill pushes through the model, padding included (the ideal-speedup bound).

    Args:
        method: a method name; ``prepack`` and varlen ``prepack:<backend>`` compute no padding,
            ``prepack:sdpa_masked`` and ``hf-packed-nocache`` fill rows as long as the longest prompt.
        lengths: (N,) prompt lengths.
    """
    from ..planner.bins import plan

    lengths = np.asarray(lengths, np.int64)
    if method == "padded":
        return int(len(lengths) * lengths.max())
    if method == "sorted":
        chunks = np.array_split(np.sort(lengths), range(micro_batch, len(lengths), micro_batch))
        return int(sum(len(ch) * ch.max() for ch in chunks))
    backend = _backend_of(method)
    if method == "hf-packed-nocache" or (backend is not None and backend in ROW_BACKENDS):
        p = plan(lengths)  # rows of the longest prompt, as the prepacking paper does
        return p.num_rows * p.capacity
    return int(lengths.sum())  # varlen and paged: no padding
