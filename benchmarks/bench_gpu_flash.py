"""Packed prefill on a GPU: exactness against each prompt run alone, and time against HF's padded prefill.

A benchmark, not a test. For each model and dtype it reports, per method (HF padded, and prepack with
``sdpa_varlen``, ``torch_varlen``, ``sdpa_masked``, and ``flash`` when flash-attn 2 or 4 imports):

* max |last-token logits - alone| and argmax agreement with each prompt run alone (padded HF included,
  so bf16 agreement can be read against HF's own);
* the median prefill time, the speedup over padded and its fraction of the token-ratio bound
  (padded tokens / real tokens), and the peak memory increase;
* greedy continuations of ``prepack.generate`` against ``model.generate``.

    python benchmarks/bench_gpu_flash.py [--prompts prompts.json] [--models llama-small,llama-4096x4]
        [--dtypes bfloat16,float32] [--repeat 10]

Prompts: the first 32 non-empty ShareGPT first turns cut at 2048 cl100k tokens (``prepack.bench``), or a
JSON list of token-id lists (``--prompts``) where the GPU machine lacks the ShareGPT package. Models have
random weights: ``llama-small`` (hidden 1024, 4 layers, 16 heads, 4 KV heads) and ``llama-4096x4`` (hidden
4096, 4 layers, 32 heads, 8 KV heads). Times are CUDA-synchronised medians, methods interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import prepack
from prepack.attention import cuda as kernels
from prepack.bench import build_model, load_prompts
from prepack.jobs.generation import left_pad

VOCAB = 100352
LARGE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=0)
BACKENDS = ("sdpa_varlen", "torch_varlen", "sdpa_masked", "flash")
PADDED = "padded (HF sdpa, left-padded, cache)"


def make_model(name: str, dtype: torch.dtype):
    if name == "llama-4096x4":
        torch.manual_seed(0)
        config = LlamaConfig(**LARGE)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config).to("cuda", dtype).eval()
    return build_model(name, dtype=dtype, device="cuda", seed=0)


def usable_backends(dtype: torch.dtype) -> list[str]:
    """The prepack backends that can run here; a refused one is printed with its reason."""
    out = []
    for backend in BACKENDS:
        try:
            prepack.resolve_backend(backend, device="cuda", dtype=dtype)
        except RuntimeError as e:
            print(f"  {backend}: not run: {e}")
            continue
        out.append(backend)
    return out


def padded_prefill(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)


def bench(model, seqs, dtype, repeat: int, new_tokens: int) -> None:
    real, padded_tokens = sum(map(len, seqs)), len(seqs) * max(map(len, seqs))
    bound = padded_tokens / real
    print(f"\n### {model.config.hidden_size} hidden, {model.config.num_hidden_layers} layers, {dtype}\n")
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {len(seqs)} prompts, {real} real tokens, "
          f"{padded_tokens} padded: token-ratio bound {bound:.2f}x; `auto` resolves to "
          f"{prepack.resolve_backend('auto', device='cuda', dtype=dtype)!r}")
    backends = usable_backends(dtype)
    ids, mask = left_pad(seqs, 0, "cuda")

    # exactness: last-token logits against each prompt run alone
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s], device="cuda")).logits[0, -1].float() for s in seqs])
    results = {PADDED: padded_prefill(model, ids, mask).logits[:, -1].float()}
    ran = {PADDED: "sdpa"}
    for backend in backends:
        r = prepack.prefill(model, seqs, backend=backend)
        results[f"prepack {backend}"], ran[f"prepack {backend}"] = r.logits.float(), r.backend
    for name, got in results.items():
        print(f"{name:40s} max |logits - alone| = {(got - alone).abs().max().item():.4f} (scale "
              f"{alone.abs().max().item():.2f}); argmax agreement {(got.argmax(-1) == alone.argmax(-1)).float().mean().item():.0%}")

    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    for backend in backends:
        got = prepack.generate(model, seqs, backend=backend, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        same = sum(g.tokens.tolist() == w[: len(g.tokens)].tolist() for g, w in zip(got, want[:, ids.shape[1]:]))
        print(f"greedy {new_tokens} tokens, prepack.generate({backend}) vs model.generate: {same}/{len(seqs)} identical")

    methods = {PADDED: lambda: padded_prefill(model, ids, mask)}
    for backend in backends:
        methods[f"prepack {backend}"] = lambda backend=backend: prepack.prefill(model, seqs, backend=backend)
    times, peak = {k: [] for k in methods}, {}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in methods.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    ref = statistics.median(times[PADDED])
    print("\n| method | kernel | median prefill | min-max | speedup over padded | of the bound | peak memory increase |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {ran[name]} | {m * 1e3:.2f} ms | {min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} ms | "
              f"{ref / m:.2f}x | {ref / m / bound:.0%} | {peak[name]:.0f} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default=None, help="JSON list of token-id lists (default: 32 ShareGPT first turns)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--models", default="llama-small,llama-4096x4")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    if args.prompts:
        seqs = json.load(open(args.prompts))[: args.n]
    else:
        seqs = [list(p) for p in load_prompts("sharegpt", args.n, max_len=2048, vocab_size=VOCAB).token_ids]
    fa = kernels.find_flash_attn()
    print(f"flash-attn: {'version ' + fa.version if fa.fn else fa.error or 'not installed'}")
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            model = make_model(name, dtype)
            bench(model, seqs, dtype, args.repeat, args.new_tokens)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
