"""``prepack.generate`` (packed prefill, then prepack's own decode engine) gives exactly the tokens of left-padded ``model.generate``, faster.

Runs offline on a random-weight preset::

    HF_HUB_OFFLINE=1 python examples/hf_prefill_and_generate.py         # 32 ShareGPT prompts, llama-tiny: seconds
    HF_HUB_OFFLINE=1 python examples/hf_prefill_and_generate.py --model llama-small --n 16 --max-len 512  # ~1 min

It checks that every request gets the same new tokens from both (that call is
also each one's warm-up), then times ``--repeat`` more calls of each,
interleaved, and prints the medians and their ratio. Packing pays off when prompt lengths vary
(ShareGPT: many short prompts, a few long ones); on equal-length prompts there
is no padding to remove and the ratio is about 1 or below.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import prepack
from prepack.bench import build_model, load_prompts, time_interleaved
from prepack.jobs.generation import left_pad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny", help="llama-tiny, llama-small, qwen2-small or a local model dir")
    ap.add_argument("--data", default="sharegpt", help="sharegpt, synthetic:lognormal, FILE.jsonl or FILE.txt")
    ap.add_argument("--n", type=int, default=32, help="prompts in the batch")
    ap.add_argument("--max-len", type=int, default=1024, help="longer prompts are skipped")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="timed calls of each, after the warm-up call")
    args = ap.parse_args(argv)

    model = build_model(args.model)
    prompts = load_prompts(args.data, args.n, max_len=args.max_len, vocab_size=model.config.vocab_size)
    print(prompts.summary())
    seqs = [torch.tensor(p) for p in prompts.token_ids]
    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def packed():
        return [g.tokens for g in prepack.generate(model, seqs, **greedy)]  # N 1-D tensors of new tokens

    def padded():
        ids, mask = left_pad(prompts.token_ids, 0, "cpu")  # (N, L_max) each
        return model.generate(input_ids=ids, attention_mask=mask, **greedy)[:, ids.shape[1]:]

    with torch.inference_mode():  # the check is also the warm-up of each
        same = all(torch.equal(a, b) for a, b in zip(packed(), padded()))
    print(f"same new tokens for all {len(seqs)} requests: {same}")

    times = time_interleaved({"prepack.generate": packed, "model.generate": padded}, repeat=args.repeat, warmup=0)
    t_packed, t_padded = (statistics.median(times[k]) for k in ("prepack.generate", "model.generate"))
    lengths = [len(p) for p in prompts.token_ids]
    print(f"{len(seqs)} prompts, {sum(lengths)} tokens, longest {max(lengths)}: left padding makes "
          f"{len(seqs) * max(lengths)} token slots ({len(seqs) * max(lengths) / sum(lengths):.2f}x the real tokens)")
    print(f"prefill + {args.new_tokens} new tokens, median of {args.repeat} after a warm-up, interleaved, "
          f"{args.model} on {torch.get_num_threads()} CPU threads:")
    print(f"  model.generate (left padded): {t_padded:.3f} s")
    print(f"  prepack.generate (packed prefill, {prepack.resolve_backend('auto', device='cpu')}): {t_packed:.3f} s")
    print(f"  model.generate time / prepack.generate time = {t_padded / t_packed:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
