"""A prompt much longer than the token budget, prefilled in chunks: exactness and peak memory (a benchmark).

    python benchmarks/bench_long_prompt.py [--tokens 16384] [--token-budget 2048] [--repeat 1] [--allocator-cache]

One --tokens-token prompt (ShareGPT first turns back to back, cl100k ids folded into the vocabulary)
goes through ``prepack.prefill`` twice: in chunks (``token_budget=--token-budget``: each forward runs at
most that many new tokens and continues the keys of the chunks before it) and whole (no budget: one
forward of every token). The model is a small llama (hidden 512, MLP 2048, 4 layers, 8 heads, 2 KV
heads, 32000-token vocab, fp32, random weights, ``max_position_embeddings`` = --tokens) on CPU.

Checked before anything is reported: the chunked prefill's last-token logits and every layer's cached
keys and values equal the whole prefill's, and the model's own forward on the prompt alone
(max abs diff <= 1e-4). Reported: the time of each, and the peak RSS growth during each (sampled,
:class:`prepack.bench.memory.MemoryMeter`; what the prefill returns, the prompt's keys and values,
is part of both), interleaved, medians.

RSS is what the process holds, and glibc's malloc keeps freed blocks: after a large block is freed it
raises its mmap threshold (up to 32 MiB) and serves later tensors from a heap it does not give back,
so the peak RSS of many forwards in a row counts memory no tensor holds any more. By default the
script fixes the threshold at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``), so that every tensor larger
than that is mapped and unmapped on its own and RSS follows the live tensors; --allocator-cache
leaves glibc's default (the figure then includes what the allocator keeps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import prepack
from prepack import oracle


def model_for(tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=tokens, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def long_prompt(tokens: int, vocab: int) -> np.ndarray:
    from prepack.bench.prompts import sharegpt_token_ids

    ids: list[int] = []
    for t in sharegpt_token_ids():
        ids += t
        if len(ids) >= tokens:
            break
    return np.asarray(ids[:tokens], np.int64) % vocab


def fix_mmap_threshold(nbytes: int) -> None:
    """glibc: map every block of at least ``nbytes`` on its own (and stop the threshold from growing)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if not ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed (not glibc?): pass --allocator-cache")


def kv_gap(a, b) -> float:
    gap = 0.0
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        gap = max(gap, float((ka - kb).abs().max()), float((va - vb).abs().max()))
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--allocator-cache", action="store_true", help="keep glibc's dynamic mmap threshold")
    args = parser.parse_args()
    if not args.allocator_cache:
        fix_mmap_threshold(64 * 1024)
    from prepack.bench.memory import MemoryMeter

    model = model_for(args.tokens)
    prompt = long_prompt(args.tokens, model.config.vocab_size)
    prepack.prefill(model, [prompt[:256]], token_budget=128)  # warm-up
    cpu = torch.device("cpu")
    times, growth, results = {"chunked": [], "whole": []}, {"chunked": [], "whole": []}, {}
    for _ in range(args.repeat):
        for name, budget in (("chunked", args.token_budget), ("whole", None)):
            results.pop(name, None)
            with MemoryMeter(cpu) as meter:
                start = time.perf_counter()
                results[name] = prepack.prefill(model, [prompt], token_budget=budget)
                times[name].append(time.perf_counter() - start)
            growth[name].append(meter.growth)
    chunked, whole = results["chunked"], results["whole"]
    logits_gap = float((chunked.logits - whole.logits).abs().max())
    cache_gap = kv_gap(chunked.request_kv(0), whole.request_kv(0))
    alone_logits, alone_caches = oracle.alone(model, [torch.from_numpy(prompt)])
    alone_gap = max(float((chunked.logits - alone_logits).abs().max()), oracle.cache_gap(chunked.dynamic_caches[0], alone_caches[0]))
    if max(logits_gap, cache_gap, alone_gap) > 1e-4:
        raise AssertionError(f"chunked prefill differs: logits {logits_gap:.1e}, cache {cache_gap:.1e}, vs alone {alone_gap:.1e}")
    kv_bytes = sum(x.numel() * x.element_size() for layer in whole.request_kv(0) for x in layer)
    t = {k: statistics.median(v) for k, v in times.items()}
    g = {k: statistics.median(v) for k, v in growth.items()}
    mib = 2**20
    rss = "glibc default allocator cache" if args.allocator_cache else "mmap threshold 64 KiB"
    print(f"{args.tokens}-token prompt, token_budget={args.token_budget}: {len(chunked.chunks)} forwards chunked, {len(whole.chunks)} whole ({rss})")
    print(f"  exact: logits {logits_gap:.1e}, cache {cache_gap:.1e} vs whole; {alone_gap:.1e} vs the model alone")
    print(f"  time: chunked {t['chunked']:.2f} s, whole {t['whole']:.2f} s")
    print(
        f"  peak RSS growth: chunked {g['chunked'] / mib:.0f} MiB, whole {g['whole'] / mib:.0f} MiB "
        f"(ratio {g['chunked'] / g['whole']:.2f}; the prompt's KV cache itself is {kv_bytes / mib:.0f} MiB of each)"
    )


if __name__ == "__main__":
    main()
