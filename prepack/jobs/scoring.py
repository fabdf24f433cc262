"""Packed scoring: lm-evaluation-harness's ``loglikelihood`` and ``loglikelihood_rolling``, exactly, without padding.

A request is a (context, continuation) pair of token ids. Its score is what
lm-eval's ``hf`` model returns: the summed log-probability of the continuation
tokens given everything before them, and whether each of them is the argmax
(greedy) token. The model runs on ``(context + continuation)[:-1]`` and only the
continuation's positions reach the LM head (:func:`prepack.forward_at` with a
span per request), so a (T, V) logits tensor is never built.

Multiple choice sends one request per choice with the same context. Requests
that share a context hold it once, as a prefix region of the executor's KV store
(:mod:`prepack.jobs`), and each choice runs the context's last token and its
continuation against it: a 4-choice question with a 500-token context and
10-token answers runs about 540 tokens instead of 2,040.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from ..hf.model import ROW_BACKENDS
from ..attention.registry import choose
from ..hf.registration import attention_needs, check_model, model_device
from ..data.batch import token_array
from .run import run_jobs
from ..hf.inputs import is_chat, with_images, check_prompts
from ..hf.vision import join
from ..hf.wrapped import unwrap

Truncate = Literal["error", "left"]


class Score(NamedTuple):
    """lm-eval's ``loglikelihood`` answer for one request (a tuple, so it compares equal to ``(float, bool)``).

    Attributes:
        logprob: summed log-probability of the continuation tokens.
        is_greedy: every continuation token is the argmax of the logits before it.
    """

    logprob: float
    is_greedy: bool


def score(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int | None = None,
    truncate: Truncate = "error",
    share_contexts: bool = True,
    share_prefixes: bool = True,
    backend: str = "auto",
    token_budget: int | None = None,
    tokenizer=None,
    processor=None,
    sum_dtype: torch.dtype | None = None,
) -> list[Score]:
    """Log-likelihood of each continuation given its context, packed; lm-eval ``loglikelihood`` semantics.

    Args:
        model: a decoder-only causal LM (see :func:`prepack.prefill`).
        requests: N ``(context, continuation)`` pairs, each a list of token ids or a 1-D integer
            tensor, or two strings with ``tokenizer`` (split into tokens as lm-eval's ``hf`` model does:
            trailing context spaces move to the continuation, the continuation is what encoding the
            whole pair adds to the context's tokens, an empty context becomes the BOS or EOS token).
            The context must not be empty (lm-eval puts its prefix token, BOS or EOS, there).
        max_length: the model's context window: at most this many input tokens per request,
            ``len(context) + len(continuation) - 1`` (default: ``max_position_embeddings``).
        truncate: what to do with a longer request: ``"error"`` (default) raises, ``"left"`` drops
            the oldest context tokens, as lm-eval's ``hf`` model does (with a warning).
        share_contexts: prefill a context that several requests share once (varlen backends only:
            with ``backend="sdpa_masked"`` pass ``share_contexts=False``); ``False`` runs each request whole.
        share_prefixes: requests whose contexts differ but start alike (a few-shot header) run the
            common prefix once (:mod:`prepack.executor.regions`); ``False`` runs each request whole.
        backend, token_budget: as in :func:`prepack.prefill`; a request longer than ``token_budget``
            runs in chunks, and ``token_budget`` also bounds how many shared-context tokens are held at once.
        processor: a vision-language model's processor; each request is then a ``(chat, continuation)``
            pair whose chat may hold images (:func:`score_with_images`; contexts are not shared).
        sum_dtype: the dtype the per-token log-probabilities are summed in. None (default): the logits'
            dtype, as lm-eval's ``hf`` model sums them (``float(logprobs.sum())``; in bf16 that rounds a
            sum of -200 to a multiple of 1); ``torch.float64``: the exact sum of the same per-token values.

    Returns:
        N :class:`Score` ``(logprob, is_greedy)``, in request order.
    """
    check_model(model)
    if truncate not in ("error", "left"):
        raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
    if processor is not None:  # chats with images: each request runs whole with its own images
        return score_with_images(model, requests, processor, max_length=max_length, truncate=truncate, backend=backend,
                                 token_budget=token_budget, sum_dtype=sum_dtype)
    limit = _context_window(model, max_length)
    requests = list(requests)
    if any(isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) for pair in requests):
        requests = encode_pairs(tokenizer, requests)
    contexts, continuations = _check_pairs(requests, limit, truncate)
    _check_continuation_ids(model, continuations)
    # the call's one kernel, passed down
    kernel = choose(backend, device=model_device(model), dtype=next(model.parameters()).dtype, needs=attention_needs(model))
    if share_contexts and kernel.rows:  # refused before anything runs ("auto" is never a row backend)
        first: dict[bytes, int] = {}
        for i, c in enumerate(contexts):
            j = first.setdefault(c.tobytes(), i)
            if j != i:
                raise ValueError(
                    f"requests {j} and {i} share a context, and share_contexts needs a varlen backend, not {kernel.name!r}; "
                    "pass share_contexts=False"
                )
    # what the model runs: (context + continuation)[:-1]; checked here so that errors name the request
    inputs = check_prompts(model, [np.concatenate([c, t[:-1]]) for c, t in zip(contexts, continuations)]).tokens
    # scored at the continuation's positions: a shared context (or any common prefix) is held once, up to them
    spans = np.array([(len(c) - 1, len(c) + len(t) - 1) for c, t in zip(contexts, continuations)], np.int64).reshape(-1, 2)
    lp, greedy = _score_spans(model, inputs, spans, continuations, kernel, token_budget, share_contexts and share_prefixes,
                              sum_dtype=_sum_dtype(model, sum_dtype))
    return [Score(float(a), bool(b)) for a, b in zip(lp, greedy)]


def score_rolling(
    model,
    documents: Sequence[Sequence[int]],
    *,
    prefix_token_id: int,
    max_length: int | None = None,
    backend: str = "auto",
    token_budget: int | None = None,
    sum_dtype: torch.dtype | None = None,
) -> list[float]:
    """Log-likelihood of whole documents, in lm-eval ``loglikelihood_rolling`` windows; packed.

    A document longer than the context window is cut into disjoint windows of at most
    ``max_length`` predicted tokens, each conditioned on the tokens before it up to the window
    (:func:`rolling_windows`), and the window scores are summed. Perplexity of document i is
    ``exp(-result[i] / len(documents[i]))``.

    Args:
        documents: N token-id lists; an empty one scores 0.0 (it has nothing to predict).
        prefix_token_id: the token the first window is conditioned on (lm-eval: BOS, else EOS).
        max_length: the context window (default: ``max_position_embeddings``).
        backend, token_budget, sum_dtype: as in :func:`score` (each window is summed in ``sum_dtype``, the
            windows in float64, as lm-eval's ``hf`` model sums them). Windows that share a context (every document's
            first window is conditioned on ``prefix_token_id`` alone) share its prefill on varlen
            backends; ``"sdpa_masked"``, which cannot continue a shared prefix, runs each window whole.

    Returns:
        N floats, the summed log-probability of every token of each document.
    """
    check_model(model)
    limit = _context_window(model, max_length)
    if limit is None:
        raise ValueError(f"{type(model).__name__} has no max_position_embeddings: pass max_length for the rolling windows")
    pairs, owner = [], []
    for i, doc in enumerate(documents):
        doc = [] if len(doc) == 0 else token_array(doc, i).tolist()
        for ctx, cont in rolling_windows(doc, prefix_token_id, limit):
            pairs.append((ctx, cont))
            owner.append(i)
    scores = score(
        model, pairs, max_length=limit, share_contexts=backend not in ROW_BACKENDS, backend=backend,
        token_budget=token_budget, sum_dtype=sum_dtype,
    )
    out = np.zeros(len(documents))
    np.add.at(out, np.asarray(owner, np.int64), np.array([s.logprob for s in scores]))
    return out.tolist()


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_seq_len: int, context_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows`` followed by ``make_disjoint_window``.

    Every token is predicted exactly once. The first window predicts the first ``max_seq_len``
    tokens from ``prefix_token``; each later one predicts up to ``max_seq_len - context_len + 1``
    new tokens, conditioned on the tokens before them so that the model input is ``max_seq_len``
    tokens long.

    Returns:
        ``(context, continuation)`` pairs with ``len(context) + len(continuation) - 1 <= max_seq_len``.
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"need 1 <= context_len <= max_seq_len, got context_len={context_len}, max_seq_len={max_seq_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        windows.append((tokens[max(end - max_seq_len - 1, 0) : end - 1], tokens[end - n : end]))
        done = end
    # disjoint: the context stops where the continuation starts
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def _context_window(model, max_length: int | None) -> int | None:
    if max_length is not None:
        if not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        return int(max_length)
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) strings -> token-id pairs, the way lm-eval's ``hf`` model encodes them
    (``_encode_pair`` and the empty-context rule of ``loglikelihood``, with ``add_bos_token=False``)."""
    if tokenizer is None:
        raise ValueError("got (context, continuation) strings but no tokenizer; pass tokenizer=")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for i, pair in enumerate(pairs):
        if not all(isinstance(x, str) for x in pair):
            raise ValueError(f"request {i} mixes strings and token ids; pass one kind of request")
        context, continuation = pair
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        cont = whole[len(ctx):]
        if not ctx and prefix is not None:  # lm-eval: the prefix token, unless the continuation starts with it
            ctx, cont = (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
        out.append((ctx, cont))
    return out


def _check_pairs(requests, limit: int | None, truncate: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate (context, continuation) pairs; errors name the request and the limit."""
    contexts, continuations = [], []
    for i, pair in enumerate(requests):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"request {i} must be a (context, continuation) pair of token-id sequences")
        ctx, cont = pair
        if len(cont) == 0:
            raise ValueError(f"request {i} has an empty continuation: there is nothing to score")
        if len(ctx) == 0:
            raise ValueError(
                f"request {i} has an empty context: the first continuation token needs a token before it "
                "(lm-eval uses its prefix token, BOS or else EOS: pass [bos_token_id] as the context)"
            )
        ctx, cont = token_array(ctx, i), token_array(cont, i)
        inputs = len(ctx) + len(cont) - 1
        if limit is not None and inputs > limit:
            if truncate == "error" or len(cont) > limit:
                raise ValueError(
                    f"request {i} has {len(ctx)} context + {len(cont)} continuation tokens, {inputs} model inputs, "
                    f"but the context window (max_length) is {limit}"
                    + (" (pass truncate='left' to drop the oldest context tokens as lm-eval does, or score whole "
                       "documents with score_rolling)" if len(cont) <= limit else "; the continuation alone is longer")
                )
            ctx = ctx[inputs - limit :]  # lm-eval: (context + continuation)[-(max_length + 1):]
        contexts.append(ctx)
        continuations.append(cont)
    return contexts, continuations


def _check_continuation_ids(model, continuations: list[np.ndarray]) -> None:
    """Refuse a continuation token outside the vocabulary up front (its log-probability would index past the logits)."""
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    if vocab is None:
        return
    for i, cont in enumerate(continuations):
        if cont.max() >= vocab:
            raise ValueError(f"request {i} has continuation token id {cont.max()} but the model's vocab_size is {vocab}")


def _sum_dtype(model, sum_dtype):
    """``sum_dtype`` checked; None -> the dtype of the model's logits (its output embeddings' weights)."""
    if sum_dtype is not None:
        if not isinstance(sum_dtype, torch.dtype) or not sum_dtype.is_floating_point:
            raise ValueError(f"sum_dtype must be a floating torch.dtype (e.g. torch.float64) or None, got {sum_dtype!r}")
        return sum_dtype
    head = unwrap(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else next(model.parameters()).dtype


def _token_scores(targets: torch.Tensor):
    """A ``reduce`` for :func:`~prepack.jobs.run.run_jobs`: (K, V) logits -> (K, 2) [log p(target), target is argmax]."""

    def reduce(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = targets[rows]
        # lm-eval takes log_softmax in the logits' dtype
        lp = torch.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0]
        return torch.stack([lp.double(), (logits.argmax(-1) == t).double()], 1)

    return reduce


def _score_spans(model, tokens, spans: np.ndarray, targets: list[np.ndarray], backend, token_budget, share_prefixes: bool,
                 vision=None, names=None, sum_dtype: torch.dtype | None = torch.float64):
    """Sum log p(targets) over each request's span: (N,) float64 log-probs and (N,) bool greedy.

    Requests that start alike share their common prefix (up to their spans: a scored position is never shared;
    choices of one context share the context);
    a request longer than ``token_budget`` runs in chunks; requests with images (``vision``) run whole.
    ``names``: each request's number in the caller's list, for errors.
    """
    if not tokens:
        return np.zeros(0), np.ones(0, bool)
    device = next(model.parameters()).device
    flat = torch.from_numpy(np.concatenate(targets)).to(device)
    run = run_jobs(
        model, tokens, backend=backend, token_budget=token_budget, spans=spans,
        reduce=_token_scores(flat), share_prefixes=share_prefixes, vision=vision, names=names,
    )
    return _per_request(run.values, spans[:, 1] - spans[:, 0], sum_dtype)


def _per_request(values: torch.Tensor, span_len: np.ndarray, sum_dtype: torch.dtype | None = None):
    """(K, 2) per-token [log p, is argmax], request after request -> per-request sum of log p and all() of argmax.

    ``sum_dtype``: each sum is rounded to it at the end (None: float64), as torch's sum of a tensor of that dtype
    rounds its wider accumulator (lm-eval's ``hf`` model sums a bf16 model's log-probs in bf16). The sum itself
    runs in float64, the closest to any order a kernel adds in.
    """
    n = len(span_len)
    acc = torch.float64
    lp = torch.zeros(n, dtype=acc, device=values.device)
    hits = np.zeros(n)
    if values.numel():  # else nothing after the first token
        owner = torch.from_numpy(np.repeat(np.arange(n), span_len)).to(values.device)
        lp.index_add_(0, owner, values[:, 0].to(acc))
        hits = values.new_zeros(n).index_add_(0, owner, values[:, 1]).cpu().numpy()
    return lp.to(sum_dtype or acc).double().cpu().numpy(), hits == span_len


# --- chats with images (score(..., processor=)) ---------------------------------------------------


def score_with_images(model, requests: Sequence, processor, *, max_length: int | None, truncate: str, backend: str,
                      token_budget: int | None, sum_dtype: torch.dtype | None = None) -> list:
    """N ``(chat, continuation)`` pairs -> N :class:`Score`, each as the model gives it alone.

    The chat goes through ``processor.apply_chat_template`` on its own (generation prompt added, so the
    continuation is the assistant's answer), the continuation is a string (its tokens are
    ``processor.tokenizer(continuation, add_special_tokens=False)``) or token ids. The model runs on
    ``(context + continuation)[:-1]`` with the context's images, and only the continuation's positions reach
    the LM head. Each request runs whole: contexts with images are not shared between requests (the scores
    are the same; only the work is). ``sum_dtype``: as in :func:`score`.
    """
    if truncate != "error":
        raise ValueError(f"truncate={truncate!r} would cut a context with images; pass truncate='error' with processor=")
    limit = _context_window(model, max_length)
    parts, contexts, continuations = [], [], []
    for i, pair in enumerate(requests):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and is_chat(pair[0])):
            raise ValueError(f"request {i}: with processor=, a request is a (chat, continuation) pair")
        chat, continuation = pair
        out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        if isinstance(continuation, str):
            continuation = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        cont = token_array(continuation, i)
        context = out["input_ids"][0]
        if len(cont) == 0:
            raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
        if limit is not None and len(context) + len(cont) - 1 > limit:
            raise ValueError(f"request {i} has {len(context) + len(cont) - 1} input tokens but the context window is {limit}")
        parts.append(with_images(model, _extended(out, cont[:-1])))
        contexts.append(len(context))
        continuations.append(cont)
    if not parts:
        return []
    _check_continuation_ids(model, continuations)
    tokens = [t for p in parts for t in p.tokens]
    spans = np.array([(c - 1, c - 1 + len(t)) for c, t in zip(contexts, continuations)], np.int64)
    lp, greedy = _score_spans(model, tokens, spans, continuations, backend, token_budget, share_prefixes=False,
                              vision=join([p.vision for p in parts]), sum_dtype=_sum_dtype(model, sum_dtype))
    return [Score(float(a), bool(b)) for a, b in zip(lp, greedy)]


def _extended(out: Mapping, extra: np.ndarray) -> dict:
    """A one-request processor output with ``extra`` text tokens appended (their token types 0)."""
    ids = torch.cat([out["input_ids"][0], torch.from_numpy(extra)])[None]
    batch = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    for k in ("mm_token_type_ids", "token_type_ids"):
        if batch.get(k) is not None:
            batch[k] = torch.cat([batch[k][0], torch.zeros(len(extra), dtype=batch[k].dtype)])[None]
    return batch
