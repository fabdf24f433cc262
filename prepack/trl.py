"""TRL's ``GRPOTrainer`` rollouts on prepack's engine: ``GRPOTrainer(rollout_func=prepack.trl.rollout_func())``.

TRL (1.16) generates, without a vLLM server, by a left-padded ``model.generate`` over ``num_generations``
copies of every prompt (each copy prefilled again, every row padded to the longest), by
``generate_batch`` (no log-probabilities), or by a ``rollout_func(prompts, trainer)`` it calls instead.
:func:`rollout_func` is one: it templates the prompts the way the trainer's own path does, decodes them
with :func:`prepack.generate` under the trainer's own ``GenerationConfig`` (temperature, top-k/p, min-p,
repetition penalty, ``max_completion_length``, EOS and pad ids), each prompt prefilled once and read by
its samples, and returns TRL's ``prompt_ids`` / ``completion_ids`` / ``logprobs``. The completions are
what TRL's own path would give each row (token for token under greedy decoding or ``top_k=1``), and the
log-probabilities are what TRL's recomputation gives those tokens (``log_softmax(logits / temperature)``
of the raw logits).

TRL is imported only when a rollout runs (it is the ``[trl]`` extra).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from .jobs.completions import logprobs as _packed_logprobs
from .jobs.decoding import integer, positive_integer
from .jobs.generation import generate


def rollout_func(
    *,
    seed: int | None = None,
    backend: str = "auto",
    token_budget: int | None = None,
    kv_budget: int | None = None,
    max_batch: int | None = None,
) -> Callable[[list, object], dict]:
    """A rollout function for ``GRPOTrainer(rollout_func=...)`` that generates with prepack's engine.

    Args:
        seed: request ``i`` of a rollout samples from its own generator seeded ``seed + i`` (the same
            completions whatever the batching; pass it to make a rollout repeatable). None: drawn from
            torch's global RNG, so the trainer's ``seed`` (``transformers.set_seed``) makes runs repeatable
            and each step draws anew.
        backend, token_budget, kv_budget, max_batch: as in :func:`prepack.generate`.

    The returned function takes ``(prompts, trainer)`` as TRL calls it: the process's prompts, plain text or
    conversational. TRL 1.16 passes each prompt ``num_generations`` times in a row; then every entry gets one
    completion and each run of equal prompts is prefilled once. Prompts that do not come in such runs (TRL's
    docstring's contract) get ``num_generations`` completions each (``num_generations_eval`` in eval mode),
    prompt-major. It returns ``{"prompt_ids", "completion_ids", "logprobs"}``: one list of ints per completion
    (its prompt's ids, its new tokens ending at the first EOS when one came, their float log-probabilities).

    Refused, with the reason: a trainer with vLLM, tools or environments, FSDP, a multimodal processor or
    prompts with images, ``bf16``/``fp16`` autocast over a policy of another dtype, and any generation setting
    :func:`prepack.generate` cannot honour (beam search, ...).
    """
    seed = None if seed is None else integer(seed, "seed")
    for name, value in (("token_budget", token_budget), ("kv_budget", kv_budget), ("max_batch", max_batch)):
        if value is not None:
            positive_integer(value, name)
    options = dict(backend=backend, token_budget=token_budget, kv_budget=kv_budget, max_batch=max_batch)

    def rollout(prompts: list, trainer) -> dict:
        _check_trainer(trainer)
        _check_prompts(prompts)
        ids = _tokenize(prompts, trainer)
        runs = _runs(ids)
        g = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if all(n % g == 0 for _, n in runs):  # TRL 1.16: each prompt arrives num_generations times (or a multiple)
            samples = runs[0][1] if len({n for _, n in runs}) == 1 else 1
            unique = [p for p, n in runs for _ in range(n // samples)]
        else:  # each prompt once: num_generations completions each
            samples, unique = g, ids
        if samples > 1 and not trainer.generation_config.do_sample:
            # transformers refuses num_return_sequences for greedy decoding: each copy is a request of its own,
            # and the engine still computes their common prompt once (shared prefixes)
            unique, samples = [p for p in unique for _ in range(samples)], 1
        prompt_ids, completion_ids, lps = _generate(trainer, unique, samples, seed, options)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": lps}

    return rollout


def _check_trainer(trainer) -> None:
    """Refuse a trainer whose generation this function cannot reproduce, naming the option."""
    args = trainer.args
    refusals = [
        (getattr(args, "use_vllm", False), "use_vllm=True: prepack generates with the policy model itself; drop use_vllm"),
        (bool(getattr(trainer, "tools", None)), "tools: the tool-calling loop is TRL's own and does not run with a rollout_func"),
        (getattr(trainer, "environment_factories", None) is not None,
         "environment_factory: environments are TRL's own loop and do not run with a rollout_func"),
        (getattr(trainer, "is_fsdp_enabled", False), "FSDP: the policy's full parameters are not gathered for prepack"),
    ]
    for bad, why in refusals:
        if bad:
            raise ValueError(f"prepack.trl.rollout_func cannot honour this GRPOTrainer's {why}")
    dtype = next(trainer.model.parameters()).dtype
    for flag, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if getattr(args, flag, False) and dtype != half:
            raise ValueError(
                f"prepack.trl.rollout_func cannot honour this GRPOTrainer's {flag}=True with a {dtype} policy: accelerate "
                f"runs its forward under {half} autocast, which prepack's engine does not reproduce exactly; load the "
                f"policy in {half} (torch_dtype={half}) or pass {flag}=False"
            )
    from transformers import ProcessorMixin

    if isinstance(trainer.processing_class, ProcessorMixin):
        raise ValueError(
            f"prepack.trl.rollout_func takes a text tokenizer; this trainer's processing class is a multimodal "
            f"{type(trainer.processing_class).__name__}, whose image inputs it does not pass (use TRL's own generation)"
        )


def _check_prompts(prompts: list) -> None:
    """Prompts are all text or all conversations of text; anything else (images, mixed) is refused."""
    from trl.data_utils import is_conversational

    if not prompts:
        raise ValueError("prepack.trl.rollout_func got no prompts")
    chats = [is_conversational({"prompt": p}) for p in prompts]
    if len(set(chats)) > 1:
        raise ValueError(f"prompt {chats.index(not chats[0])} is {'plain text' if chats[0] else 'a conversation'} but "
                         "prompt 0 is not; TRL templates one batch one way")
    for i, p in enumerate(prompts):
        if chats[0]:
            for m in p:
                content = m.get("content")
                if isinstance(content, list) and any(part.get("type") != "text" for part in content):
                    raise ValueError(f"prompt {i} carries non-text content (images); prepack.trl.rollout_func takes text "
                                     "prompts only")
        elif not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, neither text nor a conversation")


def _tokenize(prompts: list, trainer) -> list[list[int]]:
    """The prompts' token ids, templated as TRL's own path does (``GRPOTrainer._tokenize_prompts``)."""
    from trl.data_utils import is_conversational

    cls = trainer.processing_class
    if is_conversational({"prompt": prompts[0]}):
        out = cls.apply_chat_template(
            conversation=prompts, tools=None, chat_template=getattr(trainer, "chat_template", None),
            add_generation_prompt=True, tokenize=True, return_dict=True, **(trainer.chat_template_kwargs or {}),
        )
        return [list(x) for x in out["input_ids"]]
    return [list(x) for x in cls(text=prompts)["input_ids"]]


def _runs(ids: list[list[int]]) -> list[tuple[list[int], int]]:
    """Consecutive equal prompts as (prompt, count)."""
    runs: list = []
    for p in ids:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(p, n) for p, n in runs]


def _generate(trainer, prompts: list, samples: int, seed, options: dict):
    """Decode ``samples`` completions of each prompt with the trainer's policy, in eval mode (its mode restored)."""
    from trl.models import unwrap_model_for_generation

    config = copy.deepcopy(trainer.generation_config)  # TRL's own: its sampling settings and generation_kwargs
    config.num_return_sequences = samples
    with unwrap_model_for_generation(
        trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    ) as model:
        training = model.training
        model.eval()
        try:
            done = generate(model, prompts, generation_config=config, return_logprobs=True, seed=seed, **options)
            if config.do_sample or trainer.temperature == 1.0:
                lps = [d.logprobs for d in done]
            else:  # greedy: TRL's recomputation divides by its temperature all the same
                prompt_of = [prompts[d.prompt] for d in done]
                lps = _packed_logprobs(model, prompt_of, [d.tokens for d in done], temperature=trainer.temperature,
                                       backend=options["backend"], token_budget=options["token_budget"])
        finally:
            model.train(training)
    prompt_ids = [list(prompts[d.prompt]) for d in done]
    return prompt_ids, [d.tokens.tolist() for d in done], [lp.tolist() for lp in lps]
