"""Packed prefill against padded prefill on CPU, with the issue's efficiency goals (a benchmark, not a test).

    python benchmarks/bench_prefill.py [--batch 32] [--max-len 2048] [--repeat 3] [--skip 0]

Model: Llama, hidden 1024, 4 layers, 16 heads, 4 KV heads, intermediate 2816,
fp32, random weights. Batch: the first --batch non-empty ShareGPT first turns
after --skip, cl100k tokens cut at --max-len. Methods run interleaved on the
same batch; each reported time is a median over --repeat. Every method must
produce the same next token for every request before anything is timed.

Reported: speedups over padded and over dense-mask prepacking, the token-ratio
bound, the achieved matmul rate on the useful FLOPs against the rate measured
on the model's MLP shape, the share of time spent planning, packing and
scattering KV, and peak RSS growth during each prefill.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import prepack
from prepack.packing import pack_plan
from prepack.prompts import sharegpt_token_ids


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn):
    """(result, seconds, peak RSS growth in bytes) of fn(), RSS sampled every millisecond."""
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - start
    done.set()
    t.join()
    return out, dt, max(peak[0], rss() - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=100352, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    seqs = [t[: args.max_len] for t in sharegpt_token_ids() if t][args.skip: args.skip + args.batch]
    lengths = np.array([len(s) for s in seqs])
    real, padded_tokens = int(lengths.sum()), len(seqs) * int(lengths.max())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(seqs)} prompts, {real} real tokens, "
          f"{padded_tokens} padded tokens: token-ratio bound {padded_tokens / real:.2f}x")

    longest = int(lengths.max())
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s):] = torch.tensor(s)
        mask[i, longest - len(s):] = 1

    def padded():
        cache = DynamicCache()
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
                        use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    methods = {
        "padded (HF, left-padded, with cache)": padded,
        "prepack-dense (sdpa_masked, paper's method)": lambda: prepack.prefill(model, seqs, backend="sdpa_masked").logits,
        "prepack (sdpa_varlen)": lambda: prepack.prefill(model, seqs).logits,
    }
    first = {name: fn() for name, fn in methods.items()}  # warm-up and the exactness gate
    want = first["prepack (sdpa_varlen)"].argmax(-1)
    for name, logits in first.items():
        bad = torch.nonzero(logits.argmax(-1) != want).flatten()
        if len(bad):
            raise SystemExit(f"{name} disagrees with prepack on the next token of request {int(bad[0])}")
    diff = (first["padded (HF, left-padded, with cache)"] - first["prepack (sdpa_varlen)"]).abs().max().item()
    print(f"next tokens agree for all {len(seqs)} requests; max |logits padded - prepack| = {diff:.2e}\n")

    times = {k: [] for k in methods}
    peaks = {k: [] for k in methods}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            _, dt, peak = peak_rss_during(fn)
            times[name].append(dt)
            peaks[name].append(peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    pad, dense, ours = med["padded (HF, left-padded, with cache)"], med["prepack-dense (sdpa_masked, paper's method)"], med["prepack (sdpa_varlen)"]
    print("| method | median prefill | min-max | speedup over padded | peak RSS growth |")
    print("|---|---:|---:|---:|---:|")
    for name in methods:
        print(f"| {name} | {med[name]:.2f} s | {min(times[name]):.2f}-{max(times[name]):.2f} s | {pad / med[name]:.2f}x "
              f"| {statistics.median(peaks[name]) / 2**20:.0f} MiB |")

    # matmul rate on the MLP shape: all real tokens x hidden @ hidden x intermediate
    x = torch.randn(real, config.hidden_size)
    w = torch.randn(config.hidden_size, config.intermediate_size)
    x @ w
    mm = []
    for _ in range(5):
        t = time.perf_counter()
        x @ w
        mm.append(time.perf_counter() - t)
    rate = 2 * real * config.hidden_size * config.intermediate_size / statistics.median(mm)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    head_dim = config.hidden_size // config.num_attention_heads
    # causal attention: QK^T and PV, half the l x l square each, per head and layer
    attn = sum(2 * 2 * (l * (l + 1) / 2) * head_dim * config.num_attention_heads * config.num_hidden_layers for l in lengths)
    lm_head = 2 * len(seqs) * config.hidden_size * config.vocab_size
    useful = 2 * non_embedding * real + attn + lm_head
    print(f"\nuseful FLOPs {useful / 1e9:.1f} G; prepack runs them at {useful / ours / 1e9:.1f} GFLOP/s = "
          f"{useful / ours / rate:.0%} of the {rate / 1e9:.1f} GFLOP/s fp32 matmul rate on the MLP shape ({real}x1024 @ 1024x2816)")

    # overhead: planning + packing before the forward, and the KV scatter after it
    t = time.perf_counter()
    for _ in range(10):
        p = prepack.plan(lengths, real)
        pack_plan(p, [np.asarray(s) for s in seqs])
    t_pack = (time.perf_counter() - t) / 10
    result = prepack.prefill(model, seqs)
    t = time.perf_counter()
    for _ in range(3):
        result.left_padded()
    t_scatter = (time.perf_counter() - t) / 3
    print(f"plan + pack: {t_pack * 1e3:.1f} ms, KV scatter to a left-padded DynamicCache: {t_scatter * 1e3:.1f} ms: "
          f"{(t_pack + t_scatter) / ours:.2%} of prepack's prefill")
    print(f"\nprepack vs padded {pad / ours:.2f}x (token bound {padded_tokens / real:.2f}x, "
          f"{pad / ours / (padded_tokens / real):.2f}x the bound); prepack vs dense-mask prepacking {dense / ours:.2f}x; "
          f"peak RSS growth {statistics.median(peaks['prepack (sdpa_varlen)']) / max(1, statistics.median(peaks['padded (HF, left-padded, with cache)'])):.2f} of padded's")


if __name__ == "__main__":
    main()
