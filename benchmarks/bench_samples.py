"""Many samples per prompt from one prefill: prepack.generate against model.generate and generate_batch (a benchmark).

    python benchmarks/bench_samples.py [--n 32] [--samples 8] [--new-tokens 32] [--model llama-small] [--repeat 3]

N ShareGPT first turns (cut at --max-len) x G samples, --new-tokens sampled tokens each (EOS
suppressed, so every row decodes the same number). Methods, interleaved within each repeat after a
warm-up round, medians reported:

* ``model.generate(num_return_sequences=G, do_sample=True)`` on the left-padded prompts: it
  expands every prompt G times before its prefill;
* ``model.generate_batch`` (transformers' continuous batching, paged cache) on the N * G requests;
* ``prepack.generate(..., num_return_sequences=G)``: each prompt prefilled once, packed, its
  cache gathered into its G rows.

Prefill alone is compared the same way: ``model(...)`` on the G-times expanded padded batch
(what ``generate`` prefills) against ``prepack.prefill`` plus the expanded cache gather.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--model", default="llama-small")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every method first")
    args = ap.parse_args()

    import prepack
    from prepack.bench import build_model, load_prompts
    from prepack.jobs.generation import left_pad
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = build_model(args.model)
    seqs = load_prompts("sharegpt", args.n, max_len=args.max_len, on_long="truncate", vocab_size=model.config.vocab_size).token_ids
    G, new = args.samples, args.new_tokens
    ids, mask = left_pad(seqs, 0, "cpu")
    sample = dict(do_sample=True, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    def hf_generate():
        return model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=G, **sample)

    def hf_generate_batch():
        reqs = [list(s) for s in seqs for _ in range(G)]
        page = 256
        cb = ContinuousBatchingConfig(
            page_size=page, num_blocks=sum(-(-(len(p) + new) // page) for p in reqs) + 1,
            max_batch_tokens=sum(len(s) for s in seqs) * 2, max_requests_per_batch=len(reqs),
        )
        return model.generate_batch(inputs=reqs, generation_config=GenerationConfig(**sample),
                                    continuous_batching_config=cb, warmup=False)

    def pp_generate():
        return prepack.generate(model, seqs, num_return_sequences=G, progress=False, **sample)

    def hf_prefill():
        return model(ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0), logits_to_keep=1)

    def pp_prefill():
        r = prepack.prefill(model, seqs, logits=True)
        return r.left_padded_cache(rows=np.repeat(np.arange(len(seqs)), G))

    methods = {"model.generate": hf_generate, "generate_batch": hf_generate_batch, "prepack.generate": pp_generate,
               "padded prefill (x G)": hf_prefill, "prepack.prefill + G-row cache": pp_prefill}
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in methods.values():
                fn()
        for _ in range(args.repeat):
            for name, fn in methods.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {m: statistics.median(t) for m, t in times.items()}
    lengths = [len(s) for s in seqs]
    print(f"{args.n} ShareGPT prompts ({sum(lengths)} tokens, longest {max(lengths)}) x {G} samples, {new} new tokens, "
          f"{args.model} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeat}\n")
    print("| method | median s | prepack speedup |")
    print("|---|---|---|")
    for m in ("model.generate", "generate_batch", "prepack.generate"):
        print(f"| {m} | {med[m]:.2f} | {med[m] / med['prepack.generate']:.2f}x |")
    for m in ("padded prefill (x G)", "prepack.prefill + G-row cache"):
        print(f"| {m} | {med[m]:.2f} | {med[m] / med['prepack.prefill + G-row cache']:.2f}x |")


if __name__ == "__main__":
    main()
