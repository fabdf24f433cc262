"""A Qwen3.5-shaped hybrid model (gated delta-net + attention), packed, against its own left-padded batch.

    python benchmarks/bench_hybrid.py [--batch-size 32] [--max-len 1024] [--seed 0] [--repeat 3] [--warmup 1]
                                      [--new-tokens 128] [--eos-set 0.01] [--only prefill|generate|kernel]

Model: Qwen3.5's architecture (``Qwen3_5ForCausalLM``), fp32, random weights: hidden 1024, 8 layers, three
gated-delta-net layers to each attention layer, vocab 32k (see ``qwen35_shaped``). Prompts: ShareGPT first turns
drawn with --seed and cut at --max-len. Three comparisons, interleaved (--warmup untimed rounds first), medians over
--repeat, the outputs of the timed calls checked against each other:

1. **prefill**: ``prepack.prefill`` with each request's cache built (``dynamic_caches``: attention keys and the
   gated delta-net's conv and recurrent states, the model's own ``DynamicCache``) against the model's own
   left-padded batch (``model(ids, attention_mask=mask, logits_to_keep=1)``, which builds its batched cache). Both
   calls' next tokens are checked to agree, and the largest logit gap is printed.
2. **generate**: ``prepack.generate`` (each request's conv and recurrent state held across steps, every running
   request decoded in one call of each mixer) against left-padded ``model.generate``, greedy, at most
   --new-tokens, with a random --eos-set fraction of the ids declared EOS so that completions end at varied
   lengths; the tokens are checked to be the same. Then **a decode step**: the median pure decode step of that
   run (every running request's one new token) against a no-cache forward of as many one-token rows.
3. **kernel**: one gated delta-net layer on one unpacked sequence (the longest prompt): transformers' own forward
   (its torch chunked delta rule) against the same layer under prepack's packed path (``prepack.mixers``, one
   segment), and the packed stream of all prompts against each prompt through the layer alone: what packing costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import prepack
from prepack.bench import load_prompts
from prepack.jobs.generation import generate_with_backends
from transformers import LogitsProcessorList
from prepack.mixers import mixer_modules


def qwen35_shaped():
    """Qwen3.5's architecture at hidden 1024: 8 layers (3 gated delta-net : 1 attention), vocab 32k, fp32."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).eval()


def left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def packed_call(lengths: list[int]):
    """The ``prepack=`` keyword of one packed forward over segments of ``lengths`` (no KV source, no states)."""
    from prepack.attention.registry import choose
    from prepack.executor.call import PackedCall, StepLayout

    q = np.asarray(lengths, np.int64)
    return PackedCall(StepLayout(q, q, torch.device("cpu")), choose("sdpa_varlen", device=torch.device("cpu"), dtype=torch.float32))


def interleaved(fns: dict, repeat: int, warmup: int) -> tuple[dict, dict]:
    """Seconds of ``repeat`` timed calls per function (round-robin, order rotated per round, after ``warmup``
    untimed rounds), and each function's last result, for checking the outputs agree."""
    names, times, last = list(fns), {n: [] for n in fns}, {}
    for r in range(warmup + repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            last[name] = fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, last


def bench_prefill(model, seqs, repeat: int, warmup: int) -> None:
    ids, mask = left_padded(seqs)

    def padded():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]

    def packed():
        result = prepack.prefill(model, seqs)
        result.dynamic_caches  # noqa: B018 - each request's cache, as the padded call's cache is built
        return result.logits

    times, last = interleaved({"padded": padded, "prepack": packed}, repeat, warmup)
    want, got = last["padded"], last["prepack"]
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(f"next tokens agree: {agree:.0%}; largest logit gap {(want - got).abs().max().item():.2e}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| method | median s | speedup vs padded |\n|---|---|---|")
    for k in ("padded", "prepack"):
        print(f"| {k} | {med[k]:.2f} | {med['padded'] / med[k]:.2f}x |")
    print(f"\ngoal packed prefill >= 3x the left-padded batch: {'met' if med['padded'] / med['prepack'] >= 3 else 'NOT met'}\n")


def eos_set(vocab: int, fraction: float) -> list[int]:
    """A random ``fraction`` of the ids (never 0-2) declared EOS, so that greedy completions end at varied lengths."""
    ids = np.random.default_rng(1).permutation(np.arange(3, vocab))[: max(1, int(fraction * vocab))]
    return sorted(int(i) for i in ids)


def until_eos(row: list[int], eos: set) -> list[int]:
    """New tokens up to and including the first EOS (what ``prepack.generate`` returns for that request)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def bench_generate(model, seqs, new_tokens: int, eos: list[int], repeat: int, warmup: int) -> None:
    """prepack.generate against the model's own left-padded ``model.generate``, greedy, ``new_tokens`` at most; and
    prepack's pure decode steps with every request running against a no-cache forward of as many one-token rows
    (timed in the same interleaved rounds)."""
    ids, mask = left_padded(seqs)
    common = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    rows = torch.randint(3, model.config.vocab_size, (len(seqs), 1), generator=torch.Generator().manual_seed(0))
    steps, own_steps = [], []

    def padded():
        stamps = []

        def stamp(_ids, scores):  # called once per generate step: the time between two calls is one decode step
            stamps.append(time.perf_counter())
            return scores

        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([stamp]), **common)
        own_steps.extend(b - a for a, b in zip(stamps, stamps[1:]))
        return [until_eos(row, set(eos)) for row in out[:, ids.shape[1]:].tolist()]

    def packed():
        got = generate_with_backends(model, seqs, **common)
        st = got.stats
        ends = [0.0] + list(st.step_end_s)
        steps.extend(ends[i + 1] - ends[i] for i in range(st.steps)
                     if st.prompt_tokens[i] == 0 and st.decode_rows[i] == len(seqs))
        return [g.tokens.tolist() for g in got.results]

    def no_cache():
        with torch.no_grad():
            return model(input_ids=rows, use_cache=False).logits

    times, last = interleaved({"padded": padded, "prepack": packed, "no-cache": no_cache}, repeat, warmup)
    same = sum(a == b for a, b in zip(last["padded"], last["prepack"], strict=True))
    lengths = [len(t) for t in last["prepack"]]
    print(f"generate, greedy, at most {new_tokens} new tokens, EOS set of {len(eos)} ids: completion lengths "
          f"{min(lengths)}-{max(lengths)} (mean {np.mean(lengths):.1f}); same tokens as left-padded model.generate: "
          f"{same}/{len(seqs)} requests")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| method | median s | speedup vs padded |\n|---|---|---|")
    for k in ("padded", "prepack"):
        print(f"| {k} | {med[k]:.2f} | {med['padded'] / med[k]:.2f}x |")
    print(f"\ngoal generate >= 2x left-padded model.generate: {'met' if med['padded'] / med['prepack'] >= 2 else 'NOT met'}\n")
    if not steps:
        print("no decode step ran with every request running: no decode-step figure\n")
        return
    step = statistics.median(steps)
    print(f"a decode step with all {len(seqs)} requests running (median of {len(steps)} such steps of the prepack runs) "
          f"against a no-cache forward of {len(seqs)} one-token rows (median of {len(times['no-cache'])}, same rounds)")
    print("| call | median ms | vs no-cache forward |\n|---|---|---|")
    print(f"| model(ids ({len(seqs)}, 1), use_cache=False) | {med['no-cache'] * 1e3:.1f} | 1.00x |")
    print(f"| prepack decode step | {step * 1e3:.1f} | {step / med['no-cache']:.2f}x |")
    own = statistics.median(own_steps)  # left-padded: its rows stay in the batch after their EOS
    print(f"| left-padded model.generate's own decode step (median of {len(own_steps)}) | {own * 1e3:.1f} | "
          f"{own / med['no-cache']:.2f}x |")
    print(f"\ngoal decode step <= 1.25x a no-cache forward of the same rows: {'met' if step / med['no-cache'] <= 1.25 else 'NOT met'}\n")


def bench_kernel(model, seqs, repeat: int, warmup: int) -> None:
    layer = mixer_modules(model)[0][1]
    longest = max(seqs, key=len)
    with torch.no_grad():
        x_one = model.model.embed_tokens(torch.tensor([longest]))
        x_all = model.model.embed_tokens(torch.tensor([sum(seqs, [])]))
        alone = [model.model.embed_tokens(torch.tensor([s])) for s in seqs]
    one, many = packed_call([len(longest)]), packed_call([len(s) for s in seqs])
    own = type(layer).forward

    def nograd(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    fns = {
        "transformers, one sequence": nograd(lambda: own(layer, x_one)),
        "prepack packed, one sequence": nograd(lambda: layer(hidden_states=x_one, prepack=one)),
        "transformers, each prompt alone": nograd(lambda: [own(layer, x) for x in alone]),
        "prepack packed, all prompts in one stream": nograd(lambda: layer(hidden_states=x_all, prepack=many)),
    }
    times, last = interleaved(fns, repeat, warmup)
    gap = (last["transformers, one sequence"] - last["prepack packed, one sequence"]).abs().max().item()
    gap_all = (torch.cat(last["transformers, each prompt alone"], 1) - last["prepack packed, all prompts in one stream"]).abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one gated delta-net layer ({type(layer).__name__}), longest prompt {len(longest)} tokens; "
          f"packed vs own output gap {gap:.1e} (one sequence), {gap_all:.1e} (all prompts)")
    print("| call | median ms | vs transformers |\n|---|---|---|")
    for k, base in (("transformers, one sequence", "transformers, one sequence"),
                    ("prepack packed, one sequence", "transformers, one sequence"),
                    ("transformers, each prompt alone", "transformers, each prompt alone"),
                    ("prepack packed, all prompts in one stream", "transformers, each prompt alone")):
        print(f"| {k} | {med[k] * 1e3:.1f} | {med[k] / med[base]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128, help="generate: most new tokens per request")
    ap.add_argument("--eos-set", type=float, default=0.01, help="generate: fraction of the ids declared EOS")
    ap.add_argument("--only", choices=("prefill", "generate", "kernel"), help="run one of the comparisons")
    args = ap.parse_args()
    model = qwen35_shaped()
    ps = load_prompts("sharegpt", args.batch_size, max_len=args.max_len, on_long="truncate", seed=args.seed,
                      vocab_size=model.config.vocab_size)
    seqs = [list(map(int, s)) for s in ps.token_ids]
    lengths = np.array([len(s) for s in seqs])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(seqs)} ShareGPT prompts (seed {args.seed}, "
          f"{ps.num_long} cut at {args.max_len}): {lengths.sum()} real tokens, longest {lengths.max()}, "
          f"{len(seqs) * lengths.max()} padded: token-ratio bound {len(seqs) * lengths.max() / lengths.sum():.2f}x\n")
    with torch.no_grad():  # one-time costs (first calls, prepack's wrapper install) out of every timing
        model(torch.tensor([seqs[0][:8]]))
    prepack.prefill(model, [seqs[0][:8]])
    if args.only in (None, "prefill"):
        bench_prefill(model, seqs, args.repeat, args.warmup)
    if args.only in (None, "generate"):
        bench_generate(model, seqs, args.new_tokens, eos_set(model.config.vocab_size, args.eos_set), args.repeat, args.warmup)
    if args.only in (None, "kernel"):
        bench_kernel(model, seqs, args.repeat, args.warmup)


if __name__ == "__main__":
    main()
