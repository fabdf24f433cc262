"""prepack's decode engine against transformers' generate_batch and the wave-based prepack.generate (a benchmark).

Workload (issue 17): llama-small fp32 (prepack.bench.models presets), N ShareGPT first turns cut
at --max-len tokens, greedy, EOS = every 100th token id (so requests stop at different lengths,
as real ones do), --new-tokens at most. Methods, interleaved, medians of --repeat runs:

* ``engine``: :func:`prepack.generate` (its own decode loop, continuous refill);
* ``waves``: the wave-based route prepack.generate took before the engine: packed prefill of all
  but the last token, a left-padded cache, ``model.generate`` (256 prompts per wave);
* ``generate_batch``: transformers' continuous batching, sized generously to the workload (as
  ``prepack bench``'s ``hf-cb`` method sizes it).

Also measured on the engine: time to first token (median over requests), peak KV bytes against
peak live tokens x bytes/token, one decode step of B rows against a no-KV forward of the same B
rows (one token each), and tokens/s for several --batch-sizes (plotted to --plot).

    python benchmarks/bench_engine.py                                   # the full workload (long on CPU)
    python benchmarks/bench_engine.py --prompts 32 --new-tokens 32      # a reduced run
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from prepack.bench.methods import cb_config, generate_batch
from prepack.bench.models import build_model
from prepack.bench.prompts import load_prompts
from prepack.jobs.decoding import Rules
from prepack.jobs.generation import generate_with_backends, left_pad
from prepack.jobs.prefill import prefill_tokens


def eos_ids(vocab: int) -> list[int]:
    return list(range(0, vocab, 100))


def until_eos(tokens, eos: set) -> list[int]:
    """A row's tokens up to its first EOS (a padded batch fills finished rows with padding)."""
    out = []
    for t in map(int, tokens):
        out.append(t)
        if t in eos:
            break
    return out


def run_engine(model, seqs, args, max_batch=None):
    """The engine's tokens per request and its :class:`EngineStats` (steps, KV, first-token times)."""
    got = generate_with_backends(model, seqs, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                                 eos_token_id=eos_ids(model.config.vocab_size), max_batch=max_batch, progress=False)
    return [g.tokens for g in got.results], got.stats


def run_waves(model, seqs, args, wave=256):
    """The pre-engine prepack.generate: per wave, packed prefill of all but the last token + model.generate."""
    eos = eos_ids(model.config.vocab_size)
    out = []
    for a in range(0, len(seqs), wave):
        w = seqs[a:a + wave]
        longest = max(len(s) for s in w)
        ids, mask = left_pad(w, 0, "cpu")
        result = prefill_tokens(model, [np.asarray(s[:-1], np.int64) for s in w], backend="auto", token_budget=None, capacity=None, logits=False)
        cache, _ = result.left_padded_cache(pad_to=longest - 1)
        new = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=eos)[:, longest:]
        out += list(new)
    return out


def run_generate_batch(model, seqs, args):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=eos_ids(model.config.vocab_size))
    return generate_batch(model, seqs, config, args.new_tokens, config=args.cb_config, progress_bar=False)


def step_vs_forward(model, seqs, batch: int, cached: int) -> tuple[float, float]:
    """Seconds of one engine decode step of ``batch`` rows with ``cached`` keys each, and of a no-KV forward
    of the same ``batch`` one-token rows (packed, positions 0)."""
    from prepack.attention.registry import choose
    from prepack.jobs.engine import _step
    from prepack.hf.registration import attention_needs, enable
    from prepack.executor.kvstore import KVStore
    from prepack.executor.scheduler import Request

    enable(model)  # generate_batch ran the model's own attention
    kernel = choose("auto", device="cpu", dtype=torch.float32, needs=attention_needs(model, continues_keys=True))
    store = KVStore("cpu")
    rules = Rules(model, {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0}).for_request(torch.ones(1, dtype=torch.long), "cpu")
    running = {i: Request(i, np.asarray(s[:cached], np.int64), rules, None) for i, s in enumerate(seqs[:batch])}
    _step(model, kernel, store, {i: len(r.pending) for i, r in running.items()}, running, None)  # the prefill
    for r in running.values():
        r.pending = np.array([5], np.int64)
    times_step, times_fwd = [], []
    ids = torch.full((1, len(running)), 5)
    for _ in range(5):
        t = time.perf_counter()
        _step(model, kernel, store, {i: 1 for i in running}, running, None)
        times_step.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids.T, use_cache=False, logits_to_keep=1)  # B rows of one token: no KV at all
        times_fwd.append(time.perf_counter() - t)
    return statistics.median(times_step), statistics.median(times_fwd)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--methods", default="engine,waves,generate_batch")
    ap.add_argument("--batch-sizes", default="32,128,256")
    ap.add_argument("--plot", default=None, help="where to save the tokens/s vs batch size plot (png)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = build_model("llama-small")
    seqs = [list(p) for p in load_prompts("sharegpt", args.prompts, max_len=args.max_len, on_long="truncate",
                                         vocab_size=model.config.vocab_size).token_ids]
    print(f"llama-small fp32, {len(seqs)} ShareGPT prompts cut at {args.max_len} ({sum(map(len, seqs))} tokens), "
          f"greedy, EOS every 100th id, max_new_tokens={args.new_tokens}, torch threads {torch.get_num_threads()}")
    fns = {"engine": run_engine, "waves": run_waves, "generate_batch": run_generate_batch}
    methods = args.methods.split(",")
    if "generate_batch" in methods:  # sized before the timed runs: its memory probes are not its time
        args.cb_config = cb_config(model, seqs, args.new_tokens)
        print(f"generate_batch: max_batch_tokens {args.cb_config.max_batch_tokens}, {args.cb_config.num_blocks} pages "
              f"of {args.cb_config.page_size}, up to {args.cb_config.max_requests_per_batch} requests a batch")
    times = {m: [] for m in methods}
    for m in methods:  # warm-up: first calls pay one-off costs (thread pools, lazy imports) that no method should
        fns[m](model, seqs[:2], argparse.Namespace(**{**vars(args), "new_tokens": 2, "cb_config": None}))
    outs, stats = {}, None
    for _ in range(args.repeat):
        for m in methods:
            t = time.perf_counter()
            outs[m] = fns[m](model, seqs, args)
            if m == "engine":
                outs[m], stats = outs[m]
            times[m].append(time.perf_counter() - t)
            print(f"{m}: {times[m][-1]:.2f} s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    print("\n| method | seconds (median) | new tokens/s | engine speedup |\n|---|---|---|---|")
    eos = set(eos_ids(model.config.vocab_size))
    for m in methods:
        n = sum(len(until_eos(o, eos)) for o in outs[m])  # a padded route returns finished rows padded
        speed = f"{med[m] / med['engine']:.2f}x" if "engine" in med else ""
        print(f"| {m} | {med[m]:.2f} | {n / med[m]:.1f} | {speed} |")
    for m in [m for m in ("generate_batch", "waves") if m in outs and "engine" in outs]:
        same = sum(list(map(int, a)) == until_eos(b, eos) for a, b in zip(outs["engine"], outs[m], strict=True))
        why = " (waves decode left-padded rows)" if m == "waves" else ""
        print(f"\nengine vs {m}: {same}/{len(seqs)} identical token lists{why}")
    if stats is None:
        stats = run_engine(model, seqs, args)[1]
    ttft = statistics.median(stats.first_token_s.values())
    bound = stats.peak_live_tokens * stats.kv_bytes_per_token
    print(f"\nengine (its last timed run): {stats.steps} steps, {stats.tokens} tokens, at most {max(stats.batch_sizes)} requests "
          f"at once, TTFT median {ttft:.2f} s; peak KV {stats.peak_kv_bytes / 2**20:.1f} MiB "
          f"= {stats.peak_kv_bytes / max(bound, 1):.2f}x peak live tokens ({stats.peak_live_tokens}) x {stats.kv_bytes_per_token} B/token")
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        b = min(b, len(seqs))
        s, f = step_vs_forward(model, seqs, b, cached=min(256, min(len(x) for x in seqs[:b])))
        if b < max(stats.batch_sizes) or "engine" not in times:  # else the timed run above is this point
            t = time.perf_counter()
            got, _ = run_engine(model, seqs, args, max_batch=b)
            tps = sum(len(o) for o in got) / (time.perf_counter() - t)
        else:
            tps = sum(len(o) for o in outs["engine"]) / med["engine"]
        rows.append((b, s, f, tps))
    print("\n| batch | decode step (ms) | no-KV forward (ms) | ratio | engine tokens/s at max_batch |\n|---|---|---|---|---|")
    for b, s, f, tps in rows:
        print(f"| {b} | {s * 1e3:.1f} | {f * 1e3:.1f} | {s / f:.2f} | {tps:.1f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot([r[0] for r in rows], [r[3] for r in rows], marker="o")
        plt.xlabel("max_batch")
        plt.ylabel("new tokens/s")
        plt.title("prepack engine, llama-small fp32")
        plt.savefig(args.plot)


if __name__ == "__main__":
    main()
