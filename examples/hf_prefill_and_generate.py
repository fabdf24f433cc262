"""Packed prefill + ``model.generate`` decoding gives exactly the tokens of plain left-padded ``model.generate``.

Runs offline on a random-weight preset::

    HF_HUB_OFFLINE=1 python examples/hf_prefill_and_generate.py --model llama-small --n 16

It prints the time of both and whether every request got the same new tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

import prepack
from prepack.bench import build_model, left_pad
from prepack.prompts import load_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny", help="llama-tiny, llama-small, qwen2-small or a local model dir")
    ap.add_argument("--data", default="sharegpt", help="sharegpt, synthetic:lognormal, FILE.jsonl or FILE.txt")
    ap.add_argument("--n", type=int, default=8, help="prompts in the batch")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args(argv)

    model = build_model(args.model)
    prompts = load_prompts(args.data, args.n, max_len=args.max_len, vocab_size=model.config.vocab_size)
    print(prompts.summary())
    seqs = [torch.tensor(p) for p in prompts.token_ids]
    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        t = time.perf_counter()
        packed = prepack.generate(model, seqs, **greedy)  # N tensors of new tokens
        t_packed = time.perf_counter() - t

        ids, mask = left_pad(prompts.token_ids, 0, "cpu")  # (N, L_max) each
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        t_padded = time.perf_counter() - t
    padded = out[:, ids.shape[1]:]

    same = all(torch.equal(a, b) for a, b in zip(packed, padded))
    print(f"prepack.generate: {t_packed:.3f} s   model.generate (left padded): {t_padded:.3f} s   "
          f"speedup {t_padded / t_packed:.2f}x")
    print(f"same new tokens for all {len(seqs)} requests: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
