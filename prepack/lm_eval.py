"""An lm-evaluation-harness backend, ``"prepack"``: lm-eval's ``hf`` model with packed scoring and generation.

:class:`PrepackLM` is lm-eval's own ``HFLM`` (same model loading, tokenization,
prefix token, context window and request handling), with the three request
types routed through prepack:

* ``loglikelihood`` -> :func:`prepack.score` (no padding; a context shared by
  the choices of a question is prefilled once), with ``hf``'s left truncation;
* ``loglikelihood_rolling`` -> :func:`prepack.score_rolling`, lm-eval's windows;
* ``generate_until`` -> :func:`prepack.generate` (prepack's decode engine, each
  request as if alone, stopping where ``hf``'s own stop-sequence check on its
  generated tokens stops it).

Results are ``hf``'s, per request (log-likelihoods within fp32 rounding, summed
in the dtype ``hf`` sums them in; same greedy flags and generations), so the
metrics are too.

lm-eval 0.4 finds models in a registry filled when lm-eval imports its own
modules; it has no plugin entry point, so the plain ``lm_eval`` command does not
know ``prepack``. Importing this module registers it, and running it is the
``lm_eval`` command with it registered::

    python -m prepack.lm_eval run --model prepack --model_args pretrained=LOCAL_DIR,token_budget=8192 --tasks hellaswag
    # in Python: import prepack.lm_eval; lm_eval.simple_evaluate(model="prepack", ...)

Model args beyond ``hf``'s: ``token_budget`` (tokens per packed forward, default
8192 or the context window if larger), ``attn_backend`` (prepack's attention
backend, default ``auto``), ``share_contexts`` (default true) and ``sum_dtype``
(default: sum each request's token log-probabilities in the logits' dtype, as
``hf`` does, so a bf16 model's sums are bf16-rounded as ``hf``'s are;
``sum_dtype=float64`` sums the same per-token values exactly). ``batch_size``
is accepted and ignored: packing sizes the batches.
"""

from __future__ import annotations

import logging

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils_hf import MultiTokenEOSCriteria
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("prepack.lm_eval needs lm-evaluation-harness: pip install 'prepack[lm_eval]'") from e

from .jobs.generation import generate
from .hf.registration import check_model
from .jobs.scoring import score, score_rolling

logger = logging.getLogger(__name__)

NAME = "prepack"
DEFAULT_TOKEN_BUDGET = 8192


def register() -> None:
    """Register :class:`PrepackLM` as lm-eval model ``"prepack"`` (lazily, by path; idempotent)."""
    if NAME not in model_registry:
        model_registry.register(NAME, target="prepack.lm_eval:PrepackLM")


class PrepackLM(HFLM):
    """lm-eval's ``hf`` model whose requests run through prepack's packed forward."""

    def __init__(
        self,
        pretrained,
        *,
        token_budget: int | None = None,
        attn_backend: str = "auto",
        share_contexts: bool = True,
        sum_dtype: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"lm-eval model 'prepack' packs decoder-only models; {type(self.model).__name__} is {self.backend}")
        check_model(self.model)
        for name in ("softmax_dtype", "mixed_precision_dtype"):
            if getattr(self, name, None) is not None:
                raise ValueError(f"lm-eval model 'prepack' does not implement {name}; load the model in the dtype to score in")
        self.token_budget = int(token_budget) if token_budget is not None else max(DEFAULT_TOKEN_BUDGET, self.max_length)
        self.attn_backend = attn_backend
        self.share_contexts = share_contexts if isinstance(share_contexts, bool) else str(share_contexts).lower() == "true"
        if sum_dtype not in (None, "float64", torch.float64):
            raise ValueError(f"lm-eval model 'prepack' takes sum_dtype=float64 (or none: hf's sum), got {sum_dtype!r}")
        self.sum_dtype = None if sum_dtype is None else torch.float64

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """``[(cache_key, context_ids, continuation_ids), ...]`` -> ``[(logprob, is_greedy), ...]``, as ``hf``."""
        for _, context, continuation in requests:
            if len(context) + len(continuation) > self.max_length + 1:
                logger.warning(
                    f"Combined length of context ({len(context)}) and continuation ({len(continuation)}) exceeds "
                    f"the model's maximum length ({self.max_length}); truncating from the left, as lm-eval's hf model does."
                )
        scores = score(
            self.model, [(c, t) for _, c, t in requests], max_length=self.max_length, truncate="left",
            share_contexts=self.share_contexts, backend=self.attn_backend, token_budget=self.token_budget,
            sum_dtype=self.sum_dtype,
        )
        out = []
        for (key, _, _), s in zip(requests, scores):
            answer = (s.logprob, s.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods in lm-eval's rolling windows, all windows packed together."""
        documents = [self.tok_encode(req.args[0]) for req in requests]
        out = score_rolling(
            self.model, documents, prefix_token_id=self.prefix_token_id, max_length=self.max_length,
            backend=self.attn_backend, token_budget=self.token_budget, sum_dtype=self.sum_dtype,
        )
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return out

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """``hf``'s generation call, with a packed prefill: (N, L) left-padded contexts -> (N, L + new) tokens."""
        # hf's defaults: temperature 0 means greedy
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if (temp := generation_kwargs.get("temperature")) == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and temp == 0.0:
            generation_kwargs.pop("temperature", None)
        mask = generation_kwargs.pop("attention_mask", None)
        prompts = list(context) if mask is None else [row[m.bool()] for row, m in zip(context, mask)]
        # every request as if alone: hf's max_length counts the padded context, so each request gets the same
        # number of new tokens instead. Its stop sequences are hf's own check, on its generated tokens only (a stop
        # sequence that starts in the context does not stop it); lm-eval cuts the text at them afterwards
        criteria = StoppingCriteriaList([GeneratedStop(s, self.tokenizer) for s in stop])
        new = [g.tokens for g in generate(
            self.model, prompts, backend=self.attn_backend, token_budget=self.token_budget,
            max_new_tokens=max_length - context.shape[1], stopping_criteria=criteria, tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id, **generation_kwargs,
        )]
        width = max((len(x) for x in new), default=0)
        out = context.new_full((len(new), context.shape[1] + width), self.tokenizer.pad_token_id)
        out[:, : context.shape[1]] = context
        for i, tokens in enumerate(new):
            out[i, context.shape[1] : context.shape[1] + len(tokens)] = tokens
        return out


class GeneratedStop(StoppingCriteria):
    """lm-eval's ``hf`` stop-sequence check (its ``MultiTokenEOSCriteria``) for one request of prepack's engine.

    ``hf`` checks the decoded last tokens of each row's generated part, past the padded context; here a request's
    ids are its own prompt and new tokens, so the generated part starts where the first call's ids end but one
    (the engine calls a request's criteria after each new token, on its own copy of them).
    """

    def __init__(self, sequence: str, tokenizer):
        self.sequence, self.tokenizer = sequence, tokenizer
        self.check = MultiTokenEOSCriteria(sequence, tokenizer, initial_decoder_input_length=0, batch_size=1)
        self.started = False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> bool:
        if not self.started:  # (1, L): the prompt and the first new token
            self.check.initial_decoder_input_length, self.started = input_ids.shape[1] - 1, True
        return self.check(input_ids, scores)

    def __deepcopy__(self, memo):  # a fresh check per request; the tokenizer is read-only and shared
        return GeneratedStop(self.sequence, self.tokenizer)


register()


def main() -> None:
    """The ``lm_eval`` command line, with model ``"prepack"`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
