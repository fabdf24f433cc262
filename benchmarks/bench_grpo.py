"""GRPO rollouts with TRL's GRPOTrainer: prepack's rollout_func against TRL's own generation (a benchmark).

    python benchmarks/bench_grpo.py                                   # the issue's workload, llama-512
    python benchmarks/bench_grpo.py --model llama-small --eos-set 0.03  # llama-small, an EOS set: lengths vary
    python benchmarks/bench_grpo.py --prompts 4 --generations 2 --new-tokens 8 --repeat 1 --no-step  # a quick look
    python benchmarks/bench_grpo.py --pieces-only                     # part 2b alone: the engine's token choice
    python benchmarks/bench_grpo.py --only 2 --prompts 8 --new-tokens 32 --max-len 256 --repeat 2 --baseline /tmp/base
                                                  # part 2 against an older checkout, fresh processes, alternating

The workload: ``--prompts`` ShareGPT first turns (16 to ``--max-len`` tokens of a byte-level BPE trained on other
ShareGPT turns, so that prompts are text and TRL templates them itself), ``--generations`` samples each
(TRL's ``num_generations``), ``--new-tokens`` (``max_completion_length``), ``temperature=0.7, top_p=0.9``,
a random-weight Llama in fp32 on CPU: ``llama-512`` (4 layers, 512 wide, ``--vocab`` ids, 32000 by default) or ``llama-small``
(prepack's preset: 4 layers, 1024 wide, 100352 ids). ``--eos-set F`` declares a random fraction F of the
ids EOS (``generation_config.eos_token_id``, which TRL adds to its EOS ids), so that completions end at
different lengths on a random model.

Measured in one run, methods interleaved within each repeat, medians of ``--repeat``:

1. the rollout phase, ``GRPOTrainer._generate`` (templating, generation, decoding, metrics) on the
   per-process prompts as TRL 1.16 hands them (each ``num_generations`` times): TRL's default path
   (left-padded ``model.generate``), ``use_transformers_continuous_batching=True`` (``generate_batch``)
   and ``rollout_func=prepack.trl.rollout_func()``; then once more under ``top_k=1``, where the three
   must give the same completions (checked, printed);
2. ``prepack.generate`` on the same requests: greedy, ``do_sample=True, top_k=1``, ``temperature=0.7,
   top_p=0.9`` (sampling against greedy); with ``--baseline`` also in an older checkout, each checkout's
   sampled tokens checked equal;
2b. one step's token choice for the same number of requests, piece by piece, the engine's before
   (``top_p_warp``, one ``torch.multinomial`` per request) and now (``prepack.jobs.sampling``), interleaved;
3. the log-probabilities of the rollout batch: TRL's padded ``_get_per_token_logps_and_entropies``
   (batches of ``per_device_train_batch_size``) against ``prepack.logprobs`` (one packed run), with the
   largest difference between the two;
4. one full ``GRPOTrainer`` step with the prepack rollout (``per_device_train_batch_size = prompts``,
   ``steps_per_generation = generations``: the step that generates), timed by TRL's own profiling
   contexts, each phase's share of the step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def build(name: str, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prepack.bench.models import preset_config

    if name == "llama-512":
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=4096, bos_token_id=None,
                             eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    elif name == "llama-small":
        config = preset_config("llama-small")
    else:
        raise SystemExit(f"error: --model must be llama-512 or llama-small, got {name!r}")
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    return model.eval()


def tokenizer_and_prompts(n: int, max_len: int, vocab: int):
    """A byte-level BPE of ``min(vocab, 32000)`` ids trained on ShareGPT first turns 0..3999, and n later first turns
    of 16..max_len tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prepack.bench.prompts import sharegpt_first_turns

    texts = [t for t in sharegpt_first_turns() if t.strip()]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts[:4000], trainers.BpeTrainer(
        vocab_size=min(vocab, 32000), special_tokens=["[PAD]", "[UNK]", "[EOS]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    order = np.random.default_rng(0).permutation(np.arange(4000, len(texts)))
    prompts = [texts[i] for i in order if 16 <= len(tok(texts[i])["input_ids"]) <= max_len][:n]
    return tok, prompts


def trainer(model, tok, prompts, args, out_dir, rollout=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    settings = dict(
        output_dir=out_dir, per_device_train_batch_size=len(prompts), steps_per_generation=args.generations,
        num_generations=args.generations, max_completion_length=args.new_tokens, temperature=0.7, top_p=0.9,
        max_steps=1, report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", seed=0,
        disable_tqdm=True,
    )
    settings.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**settings),
                           train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                           rollout_func=rollout)


def reward(completions, **kwargs):
    """A toy reward: longer completions score higher."""
    return [float(len(c)) for c in completions]


def cb_config(prompts, tok, args) -> dict:
    """A paged cache that holds every request (the default sizes it to half of the host's memory)."""
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    page = 64
    return dict(page_size=page, num_blocks=args.generations * sum(-(-(n + args.new_tokens) // page) for n in lengths) + 1,
                max_batch_tokens=sum(lengths) * 2, max_requests_per_batch=len(prompts) * args.generations)


def timed(fn, times: list):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
    return out


def rollouts(model, tok, prompts, args, out_dir) -> dict:
    """Part 1: the rollout phase by each method; the same completions under top_k=1."""
    import prepack.trl

    repeated = [p for p in prompts for _ in range(args.generations)]
    cb = dict(use_transformers_continuous_batching=True, transformers_continuous_batching_config=cb_config(prompts, tok, args))
    methods = {"TRL default (padded model.generate)": {}, "TRL use_transformers_continuous_batching": cb,
               "prepack.trl.rollout_func": {"rollout": True}}
    if args.no_cb:
        del methods["TRL use_transformers_continuous_batching"]

    def make(config, **extra):
        config = dict(config, **extra)
        rollout = prepack.trl.rollout_func() if config.pop("rollout", False) else None
        return trainer(model, tok, prompts, args, out_dir, rollout=rollout, **config)

    trainers = {m: make(c) for m, c in methods.items()}
    times: dict = {m: [] for m in methods}
    model.train()
    torch.manual_seed(0)
    for tr in trainers.values():  # warm-up: one prompt's samples through each
        tr._generate(repeated[: args.generations])
    for _ in range(args.repeat):
        for m, tr in trainers.items():
            timed(lambda: tr._generate(repeated), times[m])
    greedy = {m: make(c, top_k=1) for m, c in methods.items()}
    same = {m: tr._generate(repeated)[1] for m, tr in greedy.items()}
    batch = trainers["prepack.trl.rollout_func"].rollout_func(repeated, trainers["prepack.trl.rollout_func"])
    model.eval()
    ref = same["prepack.trl.rollout_func"]
    return {"times": times, "same": {m: c == ref for m, c in same.items()}, "batch": batch,
            "lengths": [len(c) for c in batch["completion_ids"]], "trainer": trainers["TRL default (padded model.generate)"]}


def sampling(model, tok, prompts, args) -> dict:
    """Part 2: prepack.generate greedy, top_k=1 and temperature=0.7/top_p=0.9 on the same requests."""
    import prepack

    ids = [tok(p)["input_ids"] for p in prompts for _ in range(args.generations)]
    eos = model.generation_config.eos_token_id
    common = dict(max_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=eos, seed=0, progress=False,
                  return_logprobs=True)
    variants = {"greedy": dict(do_sample=False), "do_sample, top_k=1": dict(do_sample=True, top_k=1),
                "temperature=0.7, top_p=0.9": dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)}
    times: dict = {v: [] for v in variants}
    out = {}
    for kw in variants.values():  # warm-up
        prepack.generate(model, ids[: args.generations], **common, **kw)
    for _ in range(args.repeat):
        for v, kw in variants.items():
            out[v] = timed(lambda: prepack.generate(model, ids, **common, **kw), times[v])
    tokens = {v: sum(len(g.tokens) for g in res) for v, res in out.items()}
    same = [g.tokens.tolist() for g in out["greedy"]] == [g.tokens.tolist() for g in out["do_sample, top_k=1"]]
    digest = {v: hashlib.sha256(json.dumps([g.tokens.tolist() for g in res]).encode()).hexdigest()[:16]
              for v, res in out.items()}
    return {"times": times, "tokens": tokens, "same": same, "digest": digest}


def sampling_step(vocab: int, rows: int, repeat: int = 5) -> dict:
    """Part 2b: one decode step's token choice for ``rows`` requests at ``vocab`` ids, piece by piece (medians, ms):
    what prepack's engine runs per step beyond greedy's argmax when every request samples with its own generator.
    The engine's token choice before this change (``top_p_warp``, one ``torch.multinomial`` per request) and now
    (``prepack.jobs.sampling.warp_rows`` and ``draw``) are timed in the same loop, interleaved, and must give the
    same tokens from generators seeded alike."""
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    from prepack.jobs import sampling as now  # the engine's own pieces (private steps of _choose: measured here)
    from prepack.jobs.decoding import top_p_warp

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)])
    lists = [warpers] * rows
    gens = {k: [torch.Generator().manual_seed(i) for i in range(rows)] for k in ("before", "now")}
    state: dict = {}

    def before_warp(scores):  # the engine's application of equal row-wise warpers before this change
        return top_p_warp(warpers[0](None, scores), warpers[1])

    def before_choice():
        probs = torch.softmax(before_warp(logits.clone()), -1)
        state["before"] = [int(torch.multinomial(probs[j : j + 1], 1, generator=gens["before"][j])) for j in range(rows)]

    def now_choice():
        probs = torch.softmax(now.warp_rows(logits, lists, now.ORDER), -1)
        state["now"] = now.draw(probs, gens["now"]).tolist()

    pieces = {
        "greedy argmax": lambda: logits.argmax(-1),
        "temperature + top-p warpers (transformers', batched)": lambda: state.update(
            scores=warpers(torch.zeros(rows, 0, dtype=torch.long), logits.clone())),
        "  of which the top-p sort": lambda: torch.sort(logits, descending=False),
        "before: the warpers as the engine applied them (top_p_warp)": lambda: before_warp(logits.clone()),
        "now: the warpers as the engine applies them (sampling.warp_rows)": lambda: now.warp_rows(logits, lists, now.ORDER),
        "softmax (batched)": lambda: state.update(probs=torch.softmax(state["scores"], -1)),
        "before: one torch.multinomial per request (its own generator)": lambda: [
            torch.multinomial(state["probs"][j : j + 1], 1, generator=gens["before"][j]) for j in range(rows)],
        "now: the same draws (sampling.draw)": lambda: now.draw(state["probs"], gens["now"]),
        "before: whole token choice (warpers, softmax, draws)": before_choice,
        "now: whole token choice (warpers, softmax, draws)": now_choice,
        "log_softmax + gather (logprobs)": lambda: torch.log_softmax(logits / 0.7, -1).gather(1, logits.argmax(-1)[:, None]),
    }
    times: dict = {k: [] for k in pieces}
    same = True
    for _ in range(repeat):
        for k, fn in pieces.items():
            timed(fn, times[k])
        same &= state["before"] == state["now"]
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"ms": medians, "same": same}


def print_pieces(vocab: int, rows: int, repeat: int = 5) -> None:
    got = sampling_step(vocab, rows, repeat)
    print(f"\n2b. one decode step's token choice for {rows} requests at {vocab} ids (median ms of {repeat}, interleaved; "
          f"load average {os.getloadavg()[0]:.1f} at the end; before and now give the same tokens: {got['same']})\n")
    print("| piece | ms |\n|---|---|")
    for k, ms in got["ms"].items():
        print(f"| {k} | {ms:.1f} |")
    ms = got["ms"]
    print(f"\nwhole token choice: before / now = {ms['before: whole token choice (warpers, softmax, draws)'] / ms['now: whole token choice (warpers, softmax, draws)']:.2f}x; "
          f"now / greedy argmax = {ms['now: whole token choice (warpers, softmax, draws)'] / ms['greedy argmax']:.1f}x")


def logprobs(model, tr, batch, args) -> dict:
    """Part 3: TRL's padded per-token log-probabilities against prepack.logprobs on the rollout batch."""
    import prepack
    from trl.trainer.utils import pad

    p, c = batch["prompt_ids"], batch["completion_ids"]
    pad_id = tr.processing_class.pad_token_id
    ids = torch.cat([pad([torch.tensor(x) for x in p], padding_value=pad_id, padding_side="left"),
                     pad([torch.tensor(x) for x in c], padding_value=pad_id, padding_side="right")], 1)
    mask = torch.cat([pad([torch.ones(len(x), dtype=torch.long) for x in p], padding_value=0, padding_side="left"),
                      pad([torch.ones(len(x), dtype=torch.long) for x in c], padding_value=0, padding_side="right")], 1)
    keep = max(len(x) for x in c)
    times = {"TRL _get_per_token_logps_and_entropies": [], "prepack.logprobs": []}
    for _ in range(args.repeat):
        with torch.no_grad():
            theirs, t_ent, _ = timed(lambda: tr._get_per_token_logps_and_entropies(
                model, ids, mask, keep, batch_size=tr.args.per_device_train_batch_size, compute_entropy=True),
                times["TRL _get_per_token_logps_and_entropies"])
        ours, o_ent = timed(lambda: prepack.logprobs(model, p, c, temperature=tr.temperature, entropies=True),
                            times["prepack.logprobs"])
    live = mask[:, -keep:].bool()
    pad_seq = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    diff = max((pad_seq(ours) - theirs)[live].abs().max().item(), (pad_seq(o_ent) - t_ent)[live].abs().max().item())
    return {"times": times, "diff": diff, "padded": tuple(ids.shape), "tokens": int(mask.sum())}


def step(model, tok, prompts, args, out_dir) -> dict:
    """Part 4: one GRPOTrainer step with the prepack rollout, phases from TRL's profiling contexts."""
    import prepack.trl
    from trl.extras.profiling import ProfilingContext

    spans: dict = {}

    def record(self, duration):
        spans[self.name] = spans.get(self.name, 0.0) + duration

    rollout = prepack.trl.rollout_func()

    def profiled(prompts, tr):  # TRL profiles its own generation calls; a rollout_func it does not
        from trl.extras.profiling import profiling_context

        with profiling_context(tr, "rollout_func (prepack)"):
            return rollout(prompts, tr)

    tr = trainer(model, tok, prompts, args, out_dir, rollout=profiled)
    model.train()
    with mock.patch.object(ProfilingContext, "_log_metrics", record):
        t = time.perf_counter()
        tr.train()
        total = time.perf_counter() - t
    model.eval()
    return {"total": total, "step_time": tr.state.log_history[0].get("step_time"), "spans": spans}


PARTS = ("1", "2", "2b", "3", "4")
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])  # this benchmark's directory: the workload; prepack is the checkout's (PYTHONPATH)
import bench_grpo, prepack
args = bench_grpo.parser().parse_args(sys.argv[2:])
model, tok, prompts = bench_grpo.workload(args)
s = bench_grpo.sampling(model, tok, prompts, args)
print(json.dumps({"times": s["times"], "tokens": s["tokens"], "same": s["same"], "digest": s["digest"],
                  "prepack": prepack.__file__}))
"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-512")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000, help="llama-512's vocabulary (ids past the tokenizer's are never prompted)")
    ap.add_argument("--eos-set", type=float, default=0.0, help="fraction of the ids declared EOS (0: none)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-cb", action="store_true", help="leave out use_transformers_continuous_batching")
    ap.add_argument("--no-step", action="store_true", help="leave out the full GRPOTrainer step")
    ap.add_argument("--pieces-only", action="store_true", help="only part 2b (no model, no trainer); same as --only 2b")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run, of 1,2,2b,3,4 (3 needs 1)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="part 2 only: also run it with this checkout's prepack (an older commit), each run a fresh "
                         "process, alternating with this checkout's, --repeat rounds")
    return ap


def workload(args):
    """The model, the tokenizer and the prompts of ``args``."""
    model = build(args.model, args.vocab)
    vocab = model.config.vocab_size
    tok, prompts = tokenizer_and_prompts(args.prompts, args.max_len, vocab)
    if args.eos_set:
        ids = np.random.default_rng(1).permutation(np.arange(3, vocab))[: int(args.eos_set * vocab)]
        model.generation_config.eos_token_id = sorted(int(i) for i in ids)
    return model, tok, prompts


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    parts = ["2b"] if args.pieces_only else args.only.split(",")
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"--only takes parts of {','.join(PARTS)}, got {','.join(bad)}")
    if "3" in parts and "1" not in parts:
        ap.error("--only 3 needs part 1 (its rollout batch): pass --only 1,3")
    if args.baseline is not None and parts != ["2"]:
        ap.error("--baseline compares part 2 only: pass --only 2")
    if args.baseline is not None and not (args.baseline / "prepack" / "__init__.py").is_file():
        ap.error(f"--baseline {args.baseline} holds no prepack/ checkout")
    if not 0 <= args.eos_set < 1:
        ap.error(f"--eos-set must be in [0, 1), got {args.eos_set}")
    if parts == ["2b"]:
        print_pieces(args.vocab, args.prompts * args.generations)
        return 0
    model, tok, prompts = workload(args)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    print(f"{len(prompts)} ShareGPT prompts ({sum(lengths)} tokens, {min(lengths)}-{max(lengths)}) x {args.generations} "
          f"generations, max_completion_length={args.new_tokens}, temperature=0.7 top_p=0.9, {args.model} fp32 "
          f"(EOS set: {args.eos_set:.0%} of {model.config.vocab_size} ids), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start; median of {args.repeat}\n")
    if args.baseline is not None:
        report_baseline(args, argv if argv is not None else sys.argv[1:])
        return 0
    with tempfile.TemporaryDirectory() as out_dir:
        report(model, tok, prompts, args, out_dir, parts)
    return 0


def report_baseline(args, argv: list) -> None:
    """Part 2 in fresh processes, this checkout's prepack and ``--baseline``'s alternating (A B B A ...)."""
    from bench_regression import run_child

    here = Path(__file__).resolve().parents[1]
    child_argv = [str(Path(__file__).resolve().parent)] + [a for a in _without_baseline(argv)] + ["--repeat", "1"]
    runs: dict = {"this checkout": [], "baseline": []}
    for r in range(args.repeat):
        order = ("this checkout", "baseline") if r % 2 == 0 else ("baseline", "this checkout")
        for name in order:
            runs[name].append(run_child(here if name == "this checkout" else args.baseline.resolve(), CHILD, child_argv))
    print(f"2. prepack.generate, this checkout against --baseline {args.baseline} (fresh processes, alternating; "
          f"load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| checkout | decoding | seconds | / greedy (same checkout) | top_k=1 gives the greedy tokens | "
          "the same tokens in every run of both checkouts |\n|---|---|---|---|---|---|")
    every = runs["this checkout"] + runs["baseline"]
    for name, rows in runs.items():
        med = {v: statistics.median(x["times"][v][0] for x in rows) for v in rows[0]["times"]}
        for v, sec in med.items():
            same = len({x["digest"][v] for x in every}) == 1
            print(f"| {name} | {v} | {sec:.2f} | {sec / med['greedy']:.2f}x | {all(x['same'] for x in rows)} | {same} |")


def _without_baseline(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--baseline" or a == "--repeat":
            skip = True
        elif not a.startswith("--baseline=") and not a.startswith("--repeat="):
            out.append(a)
    return out


def report(model, tok, prompts, args, out_dir, parts: list) -> None:
    med = lambda ts: statistics.median(ts)  # noqa: E731
    if "1" in parts:
        r = rollouts(model, tok, prompts, args, out_dir)
        pp = med(r["times"]["prepack.trl.rollout_func"])
        ls = r["lengths"]
        print(f"1. rollout phase (GRPOTrainer._generate), completion lengths {min(ls)}-{max(ls)} (mean {np.mean(ls):.1f})\n")
        print("| method | seconds | / prepack | same completions under top_k=1 |\n|---|---|---|---|")
        for m, ts in r["times"].items():
            print(f"| {m} | {med(ts):.2f} | {med(ts) / pp:.2f}x | {r['same'][m]} |")
    if "2" in parts:
        s = sampling(model, tok, prompts, args)
        g = med(s["times"]["greedy"])
        print(f"\n2. prepack.generate on the same {len(prompts) * args.generations} requests "
              f"(top_k=1 gives the greedy tokens: {s['same']})\n")
        print("| decoding | seconds | / greedy | new tokens |\n|---|---|---|---|")
        for v, ts in s["times"].items():
            print(f"| {v} | {med(ts):.2f} | {med(ts) / g:.2f}x | {s['tokens'][v]} |")
    if "2b" in parts:
        print_pieces(model.config.vocab_size, len(prompts) * args.generations)
    if "3" in parts:
        lp = logprobs(model, r["trainer"], r["batch"], args)
        ours = med(lp["times"]["prepack.logprobs"])
        print(f"\n3. per-token log-probabilities and entropies of the rollout batch ({lp['tokens']} tokens, padded "
              f"{lp['padded'][0]} x {lp['padded'][1]}); largest difference {lp['diff']:.2e}\n")
        print("| function | seconds | / prepack |\n|---|---|---|")
        for m, ts in lp["times"].items():
            print(f"| {m} | {med(ts):.2f} | {med(ts) / ours:.2f}x |")
    if args.no_step or "4" not in parts:
        return
    st = step(model, tok, prompts, args, out_dir)
    total = st["step_time"] or st["total"]
    print(f"\n4. one GRPOTrainer step with the prepack rollout: {total:.2f} s (TRL's step_time); TRL's profiling:\n")
    print("| phase | seconds | share of the step |\n|---|---|---|")
    for name, sec in sorted(st["spans"].items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {sec:.2f} | {sec / total:.0%} |")


if __name__ == "__main__":
    # this checkout's prepack (not an installed copy); on import (the --baseline child) PYTHONPATH decides
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
