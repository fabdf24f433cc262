"""Packed prefill of a Mamba2-shaped model against its own left-padded batch and a loop over prompts (a benchmark).

    python benchmarks/bench_ssm_models.py [--prompts 16] [--max-len 512] [--repeat 3] [--threads N]

Model: Mamba2, fp32, random weights: hidden 512, 4 layers, 16 heads x 64 (expand 2), state 64, chunk 256,
vocab 8192. Prompts: ShareGPT-like lengths cut at --max-len, random tokens. Each method returns every
prompt's last-token logits, checked against the loop over prompts (max abs difference printed):

* ``loop``: the plain model on each prompt alone (the oracle);
* ``left-padded``: the model's own batch, left-padded with an attention mask (Mamba2 zeroes padded states);
* ``prepack``: ``prepack.forward_at`` -- one packed stream, each Mamba2 mixer called once on it (prepack's
  segment-aware conv and SSD scan on transformers' per-instance hooks).

The methods are interleaved within each repeat and the medians reported. Numbers are noisy while other
jobs use the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

import prepack
from prepack.bench.prompts import sample_lengths


def build() -> Mamba2ForCausalLM:
    config = Mamba2Config(
        hidden_size=512, num_hidden_layers=4, num_heads=16, head_dim=64, expand=2, state_size=64, n_groups=1,
        chunk_size=256, vocab_size=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return Mamba2ForCausalLM(config).eval()


def methods(model, seqs: list[list[int]]) -> dict:
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = (ids != 0) | (torch.arange(width)[None] >= width - torch.tensor([len(s) for s in seqs])[:, None])

    def loop():
        return torch.stack([model(torch.tensor([s]), use_cache=False).logits[0, -1] for s in seqs])

    def left_padded():
        return model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1).logits[:, -1]

    return {"loop": loop, "left-padded": left_padded, "prepack": lambda: prepack.forward_at(model, seqs)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build()
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in sample_lengths(args.prompts, max_len=args.max_len, seed=0)]
    seqs = [torch.randint(3, 8192, (n,), generator=g).tolist() for n in lengths]
    cases = methods(model, seqs)
    with torch.no_grad():
        want = cases["loop"]()
        for name, fn in cases.items():
            print(f"{name}: last-token logits max abs diff to loop {(fn() - want).abs().max().item():.2e}")
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{len(seqs)} prompts, {sum(lengths)} tokens (lengths {min(lengths)}..{max(lengths)}), {torch.get_num_threads()} threads")
    print("| method | median s | prepack speedup |\n|---|---|---|")
    for name, s in med.items():
        print(f"| {name} | {s:.3f} | {s / med['prepack']:.2f}x |")


if __name__ == "__main__":
    main()
