"""Packed vs padded SFT on 2 CPU ranks (gloo, DDP): the same loss step by step, and tokens per second.

Every optimizer step trains on the same global batch of examples in both modes (ShareGPT prompt lengths,
cut at --max-len): ``padded`` gives each rank half of the examples, right-padded, on transformers' sdpa;
``packed`` packs the step's examples into rows (``prepack.pack_dataset``), deals the rows to the ranks with
``prepack.planner.balance.balance_rows`` and runs prepack's attention on ``DataCollatorForPackedRows`` batches. Both
divide the summed loss by the global count of predicted tokens (``prepack.losses``), so the loss curves
agree. The driver launches ``torchrun --nproc_per_node 2`` once per mode and repeat, interleaved::

    HF_HUB_OFFLINE=1 python benchmarks/bench_sft_multirank.py --steps 6 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    import prepack
    from prepack.planner.balance import balance_rows, row_costs
    from prepack.bench.prompts import sample_lengths
    from prepack.losses import num_predicted_tokens, token_mean_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=1024,
        max_position_embeddings=args.max_len)).train()
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION if args.mode == "packed" else "sdpa")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    lengths = sample_lengths(args.steps * args.per_step, max_len=args.max_len, seed=0)
    rng = np.random.default_rng(0)
    data = [rng.integers(3, 1024, int(n)).tolist() for n in lengths]
    collate = prepack.DataCollatorForPackedRows()
    losses, tokens, seconds = [], 0, 0.0
    for s in range(args.steps):
        step = data[s * args.per_step : (s + 1) * args.per_step]
        t = time.perf_counter()
        if args.mode == "packed":
            rows = list(prepack.pack_dataset({"input_ids": step}, args.max_len))
            sched = balance_rows(row_costs([n for r in rows for n in r["seq_lengths"]], [len(r["seq_lengths"]) for r in rows]),
                                 world, 1, len(rows), seed=s)
            mine = [rows[i] for i in sched.micro_batches(rank)[0]]
            batch = collate(mine)
            labels = batch.pop("labels")
        else:
            mine = step[rank::world]
            width = max(map(len, mine))
            ids = torch.zeros(len(mine), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, x in enumerate(mine):
                ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, 0] = -100
            batch = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        count = num_predicted_tokens(labels).clone()
        dist.all_reduce(count)
        logits = ddp(**batch).logits
        if args.mode == "packed":
            loss = token_mean_loss(logits, labels, count)
        else:
            flat = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), reduction="sum")
            loss = flat / count
        (loss * world).backward()  # DDP averages gradients over ranks; the loss is already a share of the global mean
        opt.step()
        opt.zero_grad()
        seconds += time.perf_counter() - t
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
        tokens += sum(len(x) for x in step)
    if rank == 0:
        print("RESULT " + json.dumps({"mode": args.mode, "losses": losses, "tokens": tokens, "seconds": seconds}), flush=True)
    dist.destroy_process_group()


def launch(mode: str, args) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, __file__,
           "--worker", "--mode", mode, "--steps", str(args.steps), "--per-step", str(args.per_step),
           "--max-len", str(args.max_len), "--hidden", str(args.hidden), "--layers", str(args.layers)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("packed", "padded"), default="packed")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--per-step", type=int, default=32, help="examples per optimizer step (global)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs = {"packed": [], "padded": []}
    for _ in range(args.repeat):  # interleaved
        for mode in ("padded", "packed"):
            runs[mode].append(launch(mode, args))
    rate = {m: statistics.median(r["tokens"] / r["seconds"] for r in rs) for m, rs in runs.items()}
    gap = max(abs(a - b) / abs(b) for a, b in zip(runs["packed"][0]["losses"], runs["padded"][0]["losses"]))
    print(f"2 ranks (gloo, CPU), small Llama (hidden {args.hidden}, {args.layers} layers), {args.steps} steps of "
          f"{args.per_step} ShareGPT-length examples (cut at {args.max_len}); medians of {args.repeat} interleaved runs")
    print("| step | padded loss | packed loss |")
    print("|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(runs["padded"][0]["losses"], runs["packed"][0]["losses"]), 1):
        print(f"| {i} | {a:.6f} | {b:.6f} |")
    print(f"largest relative loss gap: {gap:.2e}")
    print(f"tokens/s: padded {rate['padded']:,.0f}, packed {rate['packed']:,.0f}; packed / padded = "
          f"{rate['packed'] / rate['padded']:.2f}x (goal >= 2x: {'met' if rate['packed'] >= 2 * rate['padded'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
