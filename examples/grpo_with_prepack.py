"""A few GRPO steps with TRL's ``GRPOTrainer`` whose rollouts run on prepack's engine (``rollout_func``), on CPU.

Runs offline on prepack's tiny random-weight Llama and its tokenizer (``prepack.tiny``)::

    HF_HUB_OFFLINE=1 python examples/grpo_with_prepack.py                  # 3 steps: seconds
    HF_HUB_OFFLINE=1 python examples/grpo_with_prepack.py --steps 20 --generations 8

The toy reward prefers short completions (minus the completion text's length), so the policy learns to reach
its EOS token sooner. What one switch changes: ``rollout_func=prepack.trl.rollout_func()``; everything else is TRL's
(its sampling settings, templating, rewards, loss). Before training, the example checks on this model that the
rollout gives the completions TRL's own path gives under ``top_k=1``, and that its log-probabilities are TRL's
own recomputation of them (``GRPOTrainer._get_per_token_logps_and_entropies``, a private TRL method used here as
the oracle only). The log reports each step's reward and completion lengths.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16

PROMPTS = ["the quick brown fox", "hello world", "the capital of france is", "a user asks a question",
           "packing prompts removes", "sequence packing runs"]


def brevity(completions, **kwargs) -> list[float]:
    """The toy reward: shorter is better."""
    return [-float(len(c)) for c in completions]


def make_trainer(model, tok, out_dir: str, args, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    settings = dict(
        output_dir=out_dir, per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.new_tokens, max_steps=args.steps, learning_rate=args.lr, temperature=0.9,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
    )
    rollout = config.pop("rollout_func", None)
    settings.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's and transformers' deprecation notes, not this example's
        return GRPOTrainer(model=model, reward_funcs=brevity, args=GRPOConfig(**settings),
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS[: args.prompts]}), processing_class=tok,
                           rollout_func=rollout)


def check_against_trl(model, tok, out_dir: str, args) -> tuple[bool, float]:
    """Same completions as TRL's own path under top_k=1; the largest gap to TRL's recomputed log-probabilities."""
    import prepack.trl
    from trl.trainer.utils import pad

    prompts = [p for p in PROMPTS[: args.prompts] for _ in range(args.generations)]  # as TRL 1.16 hands them over
    theirs = make_trainer(model, tok, out_dir, args, top_k=1)._generate(prompts)[1]
    ours = make_trainer(model, tok, out_dir, args, top_k=1, rollout_func=prepack.trl.rollout_func())
    out = ours.rollout_func(prompts, ours)
    p = pad([torch.tensor(x) for x in out["prompt_ids"]], padding_value=tok.pad_token_id, padding_side="left")
    c = pad([torch.tensor(x) for x in out["completion_ids"]], padding_value=tok.pad_token_id, padding_side="right")
    mask = torch.cat([pad([torch.ones(len(x), dtype=torch.bool) for x in out["prompt_ids"]], 0, "left"),
                      pad([torch.ones(len(x), dtype=torch.bool) for x in out["completion_ids"]], 0, "right")], 1)
    with torch.no_grad():
        recomputed = ours._get_per_token_logps_and_entropies(model, torch.cat([p, c], 1), mask.long(), c.shape[1])[0]
    mine = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in out["logprobs"]], batch_first=True)
    live = mask[:, -c.shape[1]:]
    return out["completion_ids"] == theirs, float((mine - recomputed)[live].abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help=f"prompts per step (at most {len(PROMPTS)})")
    ap.add_argument("--generations", type=int, default=4, help="num_generations")
    ap.add_argument("--new-tokens", type=int, default=16, help="max_completion_length")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be between 1 and {len(PROMPTS)}, got {args.prompts}")
    if args.generations < 2:
        ap.error(f"--generations must be at least 2 (GRPO compares a prompt's samples), got {args.generations}")

    import prepack.trl
    from prepack.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    model.generation_config.eos_token_id = 11  # a token this random model often produces: completions end early
    with tempfile.TemporaryDirectory() as out_dir:
        same, gap = check_against_trl(model, tok, out_dir, args)
        print(f"same completions as TRL's own path under top_k=1: {same}")
        print(f"largest |rollout logprob - TRL's recomputation|: {gap:.1e}")
        trainer = make_trainer(model, tok, out_dir, args, rollout_func=prepack.trl.rollout_func())
        trainer.train()
    for entry in trainer.state.log_history:
        if "reward" in entry:
            print(f"step {entry['step']}: reward {entry['reward']:.2f}, mean completion length "
                  f"{entry['completions/mean_length']:.1f}")
    return 0 if same and gap <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
