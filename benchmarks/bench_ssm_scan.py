"""What packing costs a state-space scan: prepack's packed scans against transformers' own torch ones (a benchmark).

    python benchmarks/bench_ssm_scan.py [--prompts 8] [--max-len 512] [--repeat 5] [--threads N]

For N prompts of ShareGPT-like lengths (cut at --max-len), each case computes every prompt's scan
output and final state, fp32, CPU:

* ``hf one sequence``: transformers' torch scan on ONE unpacked sequence as long as all the prompts
  together (what one call over the stream costs when nothing has to be kept apart; its outputs are
  wrong for every prompt but the first, so it is a cost reference, not a method);
* ``hf per prompt``: transformers' torch scan on each prompt alone, one call each (the oracle);
* ``prepack packed``: :func:`prepack.ssm.ssd_scan` / :func:`prepack.ssm.selective_scan`, one call
  over the packed stream, each prompt from zero state.

Mamba2 (SSD, chunked): heads 16 x head dim 64, state 64, chunk 256 (a Mamba2-1.3B-like layer at half
the heads). Mamba1 (selective scan, sequential): 1024 channels, state 16. The cases are interleaved
within each repeat and the medians reported; the outputs and final states of ``prepack packed`` are
checked against ``hf per prompt`` (max abs difference printed). Numbers are noisy while other jobs use
the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2

from prepack.mixers import ssm
from prepack.bench.prompts import sample_lengths


def _ssd_cases(lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total, heads, head_dim, state, chunk = sum(lengths), 16, 64, 64, 256
    x, dt = torch.randn(total, heads, head_dim, generator=g), torch.randn(total, heads, generator=g)
    A, B, C = -torch.rand(heads, generator=g), torch.randn(total, 1, state, generator=g), torch.randn(total, 1, state, generator=g)
    D, bias = torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    opts = dict(D=D, dt_bias=bias, dt_softplus=True, return_final_states=True)

    def hf(a, b):
        return modeling_mamba2.mamba2_chunk_scan(x[None, a:b], dt[None, a:b], A, B[None, a:b], C[None, a:b], chunk, **opts)

    cuts = np.cumsum([0] + lengths)

    def per_prompt():
        outs = [hf(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        return torch.cat([o[0][0] for o in outs]), torch.cat([o[1] for o in outs])

    return {
        "hf one sequence": lambda: hf(0, total),
        "hf per prompt": per_prompt,
        "prepack packed": lambda: ssm.ssd_scan(x, dt, A, B, C, lengths, chunk, D=D, dt_bias=bias, dt_softplus=True),
    }


def _mamba1_cases(lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total, channels, state = sum(lengths), 1024, 16
    u, delta, z = (torch.randn(channels, total, generator=g) for _ in range(3))
    A, B, C = -torch.rand(channels, state, generator=g), torch.randn(state, total, generator=g), torch.randn(state, total, generator=g)
    D, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)

    def hf(a, b):
        return modeling_mamba.mamba_selective_scan(
            u[None, :, a:b], delta[None, :, a:b], A, B[None, :, a:b], C[None, :, a:b], D=D, z=z[None, :, a:b],
            delta_bias=bias, delta_softplus=True, return_last_state=True,
        )

    cuts = np.cumsum([0] + lengths)

    def per_prompt():
        outs = [hf(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        return torch.cat([o[0][0] for o in outs], dim=1), torch.cat([o[1] for o in outs])

    return {
        "hf one sequence": lambda: hf(0, total),
        "hf per prompt": per_prompt,
        "prepack packed": lambda: ssm.selective_scan(u, delta, A, B, C, lengths, D=D, z=z, delta_bias=bias, delta_softplus=True),
    }


def _medians(cases: dict, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(repeat):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in sample_lengths(args.prompts, max_len=args.max_len, seed=0)]
    print(f"{args.prompts} prompts, {sum(lengths)} tokens (lengths {min(lengths)}..{max(lengths)}), {torch.get_num_threads()} threads")
    for title, build in (("Mamba2 SSD scan", _ssd_cases), ("Mamba1 selective scan", _mamba1_cases)):
        cases = build(lengths)
        with torch.no_grad():
            want, got = cases["hf per prompt"](), cases["prepack packed"]()
        diff = max((want[0] - got[0]).abs().max().item(), (want[1] - got[1]).abs().max().item())
        med = _medians(cases, args.repeat)
        base = med["hf per prompt"]
        print(f"\n{title}: prepack packed vs hf per prompt, outputs and final states max abs diff {diff:.2e}")
        print("| case | median s | vs hf per prompt |\n|---|---|---|")
        for name, s in med.items():
            print(f"| {name} | {s:.4f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
