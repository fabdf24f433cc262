"""The flash path on a GPU: exactness against the reference and prefill time against padded HF (a benchmark, not a test).

    python benchmarks/bench_gpu_flash.py --prompts prompts.json [--dtype bfloat16] [--repeat 10]

``prompts.json`` holds a list of token-id lists (e.g. 32 ShareGPT first turns
from ``prepack.bench.prompts``; the GPU machine may have no ShareGPT package). The
model is the llama-small preset (hidden 1024, 4 layers, 16 heads, 4 KV heads)
with random weights. Times are CUDA-synchronised medians, methods interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import prepack
from prepack.generation import left_pad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--backends", default="flash,sdpa_varlen,sdpa_masked", help="prepack backends to check and time")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    seqs = json.load(open(args.prompts))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=100352, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    real = sum(map(len, seqs))
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {len(seqs)} prompts, {real} real tokens, "
          f"{len(seqs) * max(map(len, seqs))} padded; dtype {args.dtype}")

    # exactness: last-token logits of each backend against each prompt run alone
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s], device="cuda")).logits[0, -1].float() for s in seqs])
    backends = args.backends.split(",")
    for backend in backends:
        got = prepack.prefill(model, seqs, backend=backend).logits.float()
        print(f"{backend:12s} max |logits - alone| = {(got - alone).abs().max().item():.4f} "
              f"(alone's own scale: {alone.abs().max().item():.2f}); argmax agreement "
              f"{(got.argmax(-1) == alone.argmax(-1)).float().mean().item():.0%}")
    ids, mask = left_pad(seqs, 0, "cuda")
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = prepack.generate(model, seqs, backend=backends[0], max_new_tokens=16, do_sample=False, pad_token_id=0)
    same = sum(g.tolist() == w[: len(g)].tolist() for g, w in zip(got, want[:, ids.shape[1]:]))
    print(f"greedy 16 tokens, prepack.generate({backends[0]}) vs model.generate: {same}/{len(seqs)} requests identical")

    def padded():
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

    methods = {"padded (HF sdpa, left-padded, cache)": padded}
    for backend in backends:
        methods[f"prepack {backend}"] = lambda backend=backend: prepack.prefill(model, seqs, backend=backend)
    times = {k: [] for k in methods}
    peak = {}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.repeat):
        for name, fn in methods.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    ref = statistics.median(times["padded (HF sdpa, left-padded, cache)"])
    print("\n| method | median prefill | min-max | speedup over padded | peak memory increase |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.2f} ms | {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} ms | {ref / m:.2f}x | {peak[name]:.0f} MiB |")


if __name__ == "__main__":
    main()
