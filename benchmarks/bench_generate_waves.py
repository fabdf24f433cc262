"""prepack.generate over many prompts: resident memory after each wave stays flat (a benchmark).

    python benchmarks/bench_generate_waves.py [--n 10000] [--model llama-tiny] [--new-tokens 4] [--wave-size 256]

N ShareGPT first turns (cut at --max-len) stream through ``prepack.generate_iter`` in waves;
the resident set size is read after each wave's last result. Flat means: the RSS after the last
wave is within a few percent of the RSS after the first waves, i.e. memory is bounded by a wave,
not by N.
"""

from __future__ import annotations

import argparse
import resource
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--wave-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=2048)
    args = ap.parse_args()

    import torch

    import prepack
    from prepack.bench import build_model, load_prompts

    model = build_model(args.model)
    seqs = load_prompts("sharegpt", args.n, max_len=args.max_len, on_long="truncate", vocab_size=model.config.vocab_size).token_ids
    rss, t = [], time.perf_counter()
    with torch.no_grad():
        stream = prepack.generate_iter(model, iter(seqs), max_batch=args.wave_size, max_new_tokens=args.new_tokens,
                                       do_sample=False, progress=False)
        for i, _ in enumerate(stream, 1):
            if i % args.wave_size == 0 or i == len(seqs):
                rss.append(_rss_mb())
    seconds = time.perf_counter() - t
    tokens = sum(len(s) for s in seqs)
    print(f"{len(seqs)} ShareGPT prompts ({tokens} tokens), {args.model}, {args.new_tokens} new tokens, "
          f"waves of {args.wave_size}: {len(rss)} waves in {seconds:.1f} s\n")
    print(f"RSS after wave 1 / 5 / 10 / last: " + " / ".join(f"{rss[i]:.0f}" for i in (0, min(4, len(rss) - 1), min(9, len(rss) - 1), -1)) + " MB")
    settled = rss[min(4, len(rss) - 1):]
    print(f"from wave 5 on: min {min(settled):.0f} MB, max {max(settled):.0f} MB, last/wave-5 {settled[-1] / settled[0]:.3f}")


if __name__ == "__main__":
    main()
