"""The decode engine with shared prefixes held once and long prompts in chunks (a benchmark, issue 20).

Three workloads, each run interleaved (``--repeat`` times, medians) with the same tokens checked:

* ``system``: ``--chats`` chats share a ``--system``-token system prompt (ShareGPT text, folded into
  the vocabulary), each followed by its own user turn, a ShareGPT first turn of 20-200 tokens;
  llama-small fp32, greedy, ``--new-tokens`` new tokens; ``share_prefixes=True`` against ``False``.
  KV memory is checked against ``(prefix + suffixes + new tokens) x bytes per token``.
* ``samples``: ``--sample-prompts`` ShareGPT prompts (200-1000 tokens) x ``--samples`` samples each
  (``num_return_sequences``, seeded sampling), llama-small: the samples share their prompt's keys.
* ``long``: a ``--long``-token prompt arrives among 64 decoding requests (tiny llama whose
  ``max_position_embeddings`` allows it); ``token_budget=--budget`` (the prompt is prefilled in
  chunks beside the decodes) against a budget that takes it in one step. Reports the worst gap
  between two tokens of a decoding request (:meth:`prepack.jobs.engine.EngineStats.worst_decode_gap_s`).

    python benchmarks/bench_engine_prefixes.py                 # default: 16 chats, 4 prompts x 8 samples (~3 min)
    python benchmarks/bench_engine_prefixes.py --chats 64 --sample-prompts 8 --workloads system,samples  # full
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from prepack.bench.models import build_model, preset_config
from prepack.bench.prompts import fit_vocab, source_prompts
from prepack.jobs.generation import generate_with_backends


def sharegpt(vocab: int, lo: int, hi: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` ShareGPT first turns of ``lo``..``hi`` tokens, in a seeded order, folded into ``vocab`` ids."""
    pool = source_prompts("sharegpt", vocab_size=vocab, n=n, seed=seed)
    order = np.random.default_rng(seed).permutation(len(pool))
    picked = [list(pool[i]) for i in order if lo <= len(pool[i]) <= hi][:n]
    return fit_vocab(picked, vocab)[0]


def system_prompt(vocab: int, length: int) -> list[int]:
    """``length`` tokens of ShareGPT text (long first turns joined), the same every run."""
    out: list[int] = []
    for p in sharegpt(vocab, 500, 10**9, 64, seed=1):
        out += p
        if len(out) >= length:
            return out[:length]
    raise ValueError(f"not enough ShareGPT text for a {length}-token system prompt")


def timed(fn, **kwargs):
    t = time.perf_counter()
    got = fn(**kwargs)
    return time.perf_counter() - t, got


CPU_S: dict = {}  # share_prefixes -> CPU seconds of each run (less sensitive than wall time to other jobs)


def interleave(model, seqs, repeat: int, **kwargs) -> dict:
    """Median seconds and the last run of each of share_prefixes=True / False, interleaved."""
    runs = {True: [], False: []}
    CPU_S.clear()
    last = {}
    for _ in range(repeat):
        for share in (True, False):
            c = time.process_time()
            s, got = timed(generate_with_backends, model=model, sequences=seqs, share_prefixes=share, progress=False, **kwargs)
            CPU_S.setdefault(share, []).append(time.process_time() - c)
            runs[share].append(s)
            last[share] = got
    return {share: (statistics.median(v), last[share]) for share, v in runs.items()}


def same_tokens(a, b) -> bool:
    return all(x.tokens.tolist() == y.tokens.tolist() for x, y in zip(a, b, strict=True))


def system_workload(model, args) -> None:
    vocab = model.config.vocab_size
    prefix = system_prompt(vocab, args.system)
    turns = sharegpt(vocab, 20, 200, args.chats)
    seqs = [prefix + t for t in turns]
    print(f"\n## system: {args.chats} chats, a {args.system}-token system prompt + ShareGPT turns of "
          f"{min(map(len, turns))}-{max(map(len, turns))} tokens ({sum(map(len, seqs))} prompt tokens), "
          f"greedy, {args.new_tokens} new tokens")
    res = interleave(model, seqs, args.repeat, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                     return_logprobs=True)
    report(res, new_tokens=sum(len(c.tokens) for c in res[True][1].results), prefix=len(prefix),
           suffixes=sum(map(len, turns)))


def samples_workload(model, args) -> None:
    vocab = model.config.vocab_size
    prompts = sharegpt(vocab, 200, 1000, args.sample_prompts, seed=2)
    print(f"\n## samples: {len(prompts)} ShareGPT prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"x {args.samples} samples (seeded, temperature 1, top_k 50), {args.new_tokens} new tokens")
    res = interleave(model, prompts, args.repeat, max_new_tokens=args.new_tokens, do_sample=True, top_k=50,
                     num_return_sequences=args.samples, seed=0, pad_token_id=0, return_logprobs=True)
    report(res, new_tokens=sum(len(c.tokens) for c in res[True][1].results), prefix=sum(map(len, prompts)) - len(prompts),
           suffixes=len(prompts) * args.samples)


def report(res: dict, *, new_tokens: int, prefix: int, suffixes: int) -> None:
    (t_on, on), (t_off, off) = res[True], res[False]
    print("same tokens:", same_tokens(on.results, off.results))
    print("\n| share_prefixes | seconds (median) | CPU seconds (median) | peak KV MB | peak live tokens | regions | prompt tokens not recomputed |\n|---|---|---|---|---|---|---|")
    for name, t, g in (("True", t_on, on), ("False", t_off, off)):
        s = g.stats
        print(f"| {name} | {t:.2f} | {statistics.median(CPU_S[name == 'True']):.2f} | {s.peak_kv_bytes / 2**20:.1f} | {s.peak_live_tokens} | {s.prefix_regions} | {s.shared_prefix_tokens} |")
    need = (prefix + suffixes + new_tokens) * on.stats.kv_bytes_per_token
    cpu = statistics.median(CPU_S[False]) / statistics.median(CPU_S[True])
    print(f"\nspeed-up {t_off / t_on:.2f}x (CPU time {cpu:.2f}x); KV {on.stats.peak_kv_bytes / need:.2f}x (prefix + suffixes + new tokens "
          f"= {prefix} + {suffixes} + {new_tokens} tokens, {need / 2**20:.1f} MB); unshared KV "
          f"{off.stats.peak_kv_bytes / on.stats.peak_kv_bytes:.2f}x the shared")


def long_workload(args) -> None:
    from transformers import LlamaForCausalLM

    config = preset_config("llama-tiny")
    config.max_position_embeddings = args.long + 128
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    vocab = config.vocab_size
    short = sharegpt(vocab, 20, 30, 64, seed=3)
    long = (system_prompt(vocab, 10_000) * (args.long // 10_000 + 1))[: args.long]
    seqs = short + [long]
    # request 0 stops first, and the long prompt (waiting behind the 64 with max_batch=64) arrives in its place
    new = [4] + [args.long_new] * 63 + [4]
    print(f"\n## long: a {args.long}-token prompt arrives among 64 decoding requests (llama-tiny, "
          f"max_position_embeddings {config.max_position_embeddings}), {args.long_new} new tokens each")
    rows = {}
    for _ in range(args.repeat):
        for name, budget in (("chunked", args.budget), ("one step", args.long + 128)):
            t, g = timed(generate_with_backends, model=model, sequences=seqs, max_new_tokens=new, do_sample=False,
                         pad_token_id=0, max_batch=64, token_budget=budget, progress=False)
            rows.setdefault(name, []).append((t, g))
    outs = {name: v[-1][1] for name, v in rows.items()}
    print("same tokens:", all(a.tolist() == b.tolist() for a, b in zip(outs["chunked"].results, outs["one step"].results)))
    print("\n| long prompt | token_budget | seconds (median) | worst decode gap s (median) | steps feeding the long prompt | decode rows in them |\n|---|---|---|---|---|---|")
    for (name, v), budget in zip(rows.items(), (args.budget, args.long + 128)):
        s = v[-1][1].stats
        prompt_steps = [i for i, n in enumerate(s.prompt_tokens) if i and n >= 1000]  # step 0: the 64 short prompts
        gap = statistics.median(g.stats.worst_decode_gap_s() for _, g in v)
        print(f"| {name} | {budget} | {statistics.median(t for t, _ in v):.2f} | {gap:.3f} | {len(prompt_steps)} | "
              f"{sorted({s.decode_rows[i] for i in prompt_steps})} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="system,samples,long")
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--system", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sample-prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--long", type=int, default=16384)
    ap.add_argument("--long-new", type=int, default=32)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}")
    work = args.workloads.split(",")
    if {"system", "samples"} & set(work):
        model = build_model("llama-small")
        if "system" in work:
            system_workload(model, args)
        if "samples" in work:
            samples_workload(model, args)
    if "long" in work:
        long_workload(args)


if __name__ == "__main__":
    main()
