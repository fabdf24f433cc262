"""Padded vs packed prefill over a range of batch sizes, as a markdown table and a PNG.

A thin wrapper over :mod:`prepack.bench` (the API behind ``prepack bench``)::

    HF_HUB_OFFLINE=1 python examples/benchmark_padded_vs_packed.py                       # llama-tiny: well under a minute
    HF_HUB_OFFLINE=1 python examples/benchmark_padded_vs_packed.py --model llama-small --max-len 512   # minutes

Every batch is the first B of the same ShareGPT prompts. Each method runs once
untimed (its next tokens checked against padded's), then ``--repeat`` times,
interleaved with the other methods; the table shows medians. The PNG has two
panels: speedup over padded vs batch size, one line per method, and the
prompt-length histogram of the data.
"""

from __future__ import annotations

import argparse

import torch

from prepack.bench import (
    DEFAULT_METHODS,
    build_model,
    format_speedups,
    format_table,
    load_prompts,
    plot_results,
    run_sweep,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--data", default="sharegpt")
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--metric", default="prefill", choices=("prefill", "ttft", "generate"))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated: padded, sorted, prepack, prepack:<backend>, hf-packed-nocache, hf-cb")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="speedup.png")
    args = ap.parse_args(argv)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model = build_model(args.model)
    prompts = load_prompts(args.data, max(batch_sizes), max_len=args.max_len, vocab_size=model.config.vocab_size)
    print(prompts.summary())
    rows = run_sweep(
        model, prompts.token_ids, batch_sizes, metrics=(args.metric,), methods=args.methods.split(","),
        repeat=args.repeat, warmup=1, new_tokens=8,
    )
    print(f"{args.model} (random weights), {torch.get_num_threads()} torch threads\n")
    print(format_table(rows))
    print()
    print(format_speedups(rows))
    plot_results(rows, prompts.lengths, args.out, max_len=args.max_len, title=f"{args.model}: {args.metric}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
