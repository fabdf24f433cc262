"""Packed log-likelihood scoring against lm-eval's ``hf`` model on CPU (a benchmark, not a test).

    python benchmarks/bench_score.py [--requests 2000] [--max-len 512] [--questions 50] [--batch-sizes 1,8,32,auto]

Two workloads, both scored by the llama-small preset (hidden 1024, 4 layers, 16
heads, 4 KV heads, 100352-token vocab, fp32, random weights):

* ``sharegpt``: --requests ShareGPT first turns (cl100k ids, cut at --max-len,
  at least 2 tokens), each split into a context and a continuation of its last
  ``clip(n // 4, 1, 16)`` tokens;
* ``mc``: --questions 4-choice questions, contexts of 450-550 random tokens
  shared by the 4 choices, continuations of 8-12 tokens.

lm-eval's ``hf`` model (``HFLM._loglikelihood_tokens``: it sorts requests by
length, pads each batch on the right, and caches one-token continuations) runs
each workload at every --batch-sizes; prepack runs ``prepack.score`` with
--token-budget. Every method's log-likelihoods and greedy flags are checked
against the first hf run (max abs diff <= 1e-4, flags equal) before a time is
reported. Times are one run each, after a warm-up, in one process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import prepack


def sharegpt_requests(n: int, max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    from prepack.bench.prompts import sharegpt_token_ids
    ids = [t[:max_len] for t in sharegpt_token_ids() if len(t) >= 2]
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(ids), n, replace=len(ids) < n):
        t = ids[i]
        k = int(np.clip(len(t) // 4, 1, 16))
        out.append((t[:-k], t[-k:]))
    return out


def mc_requests(questions: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(questions):
        context = rng.integers(3, vocab, int(rng.integers(450, 551))).tolist()
        out += [(context, rng.integers(3, vocab, int(rng.integers(8, 13))).tolist()) for _ in range(4)]
    return out


def hflm(model, batch_size):
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # _loglikelihood_tokens takes token ids: the tokenizer only has to exist
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), pad_token="<unk>")
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_batch_size=32, max_length=4096, device="cpu")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def check(name: str, got, want) -> None:
    diff = max(abs(a[0] - b[0]) for a, b in zip(got, want))
    if diff > 1e-4 or [a[1] for a in got] != [b[1] for b in want]:
        raise AssertionError(f"{name}: log-likelihoods differ from hf's by {diff:.2e} or greedy flags differ")


def run(workload: str, model, requests, batch_sizes, token_budget: int) -> list[dict]:
    rows, reference = [], None
    n_tokens = sum(len(c) + len(t) - 1 for c, t in requests)
    prepack.score(model, requests[:8], token_budget=token_budget)  # warm-up
    for bs in batch_sizes:
        lm = hflm(model, bs if bs == "auto" else int(bs))
        seconds, out = timed(lambda: lm._loglikelihood_tokens([(None, c, t) for c, t in requests], disable_tqdm=True))
        reference = reference or out
        check(f"hf batch_size={bs}", out, reference)
        rows.append({"workload": workload, "method": f"hf bs={bs}", "seconds": seconds})
    seconds, out = timed(lambda: prepack.score(model, requests, token_budget=token_budget))
    check("prepack", out, reference)
    rows.append({"workload": workload, "method": f"prepack (budget {token_budget})", "seconds": seconds})
    best = min(r["seconds"] for r in rows if r["method"].startswith("hf"))
    for r in rows:
        r["speedup vs best hf"] = best / r["seconds"]
        r["tokens/s"] = n_tokens / r["seconds"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--batch-sizes", default="1,8,32,auto")
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--workloads", default="sharegpt,mc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from prepack.bench import build_model

    model = build_model("llama-small")
    batch_sizes = args.batch_sizes.split(",")
    rows = []
    for workload in args.workloads.split(","):
        if workload == "sharegpt":
            requests = sharegpt_requests(args.requests, args.max_len, args.seed)
        else:
            requests = mc_requests(args.questions, model.config.vocab_size, args.seed)
        lengths = np.array([len(c) + len(t) for c, t in requests])
        print(f"{workload}: {len(requests)} requests, tokens per request mean {lengths.mean():.0f}, max {lengths.max()}", flush=True)
        for r in run(workload, model, requests, batch_sizes, args.token_budget):
            rows.append(r)
            print(f"  {r['method']:<22} {r['seconds']:8.2f} s  {r['tokens/s']:9.0f} tok/s  x{r['speedup vs best hf']:.2f}", flush=True)
    print("\n| workload | method | seconds | tokens/s | speed-up vs fastest hf |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['method']} | {r['seconds']:.2f} | {r['tokens/s']:.0f} | {r['speedup vs best hf']:.2f}x |")


if __name__ == "__main__":
    main()
