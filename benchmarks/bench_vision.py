"""Prompts with images, packed against the processor's padded batch (a benchmark; issue 19).

Workload: a tiny random-weight Qwen2.5-VL (fp32, CPU) and its own processor class with the PIL-backed
image processor; N requests, one image each, drawn in code at one of three sizes (4, 6 or 12 image
tokens after merging, see SIZES), text lengths of the first N ShareGPT first turns (cut at --max-len tokens;
each ShareGPT token becomes one word of the offline tokenizer). Both methods get the same processor
output, left-padded (what ``model.generate`` wants). Interleaved, medians of --repeat runs:

* prefill: ``prepack.prefill(model, batch)`` (last-token logits and per-request caches) against the
  model's own forward on the padded batch (``model(**batch)``, all logits);
* generate: ``prepack.generate(model, batch, max_new_tokens=32)`` against ``model.generate(**batch)``
  (greedy). Both must give the same tokens per request (checked; the run stops otherwise).

    python benchmarks/bench_vision.py                 # the default run (about 2.5 minutes, one CPU thread)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepack  # noqa: E402
from prepack.bench.measure import time_interleaved  # noqa: E402
from prepack.bench.prompts import load_prompts  # noqa: E402
from prepack.tiny_vision import image, qwen_model, qwen_processor  # noqa: E402

# the text model: small, but large enough that its work, not Python overhead, is what the methods differ in
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
SIZES = [(56, 56), (84, 56), (112, 84)]  # pixels -> 4, 6 and 12 image tokens after merging


def workload(processor, n: int, max_len: int):
    """The processor's left-padded batch for n requests of one image each and ShareGPT text lengths."""
    tok = processor.tokenizer
    words = [w for w, i in sorted(tok.get_vocab().items(), key=lambda x: x[1]) if w.isalpha() and len(w) > 1]
    lengths = [len(t) for t in load_prompts("sharegpt", n, max_len=max_len, on_long="truncate", vocab_size=len(words)).token_ids]
    rng = np.random.default_rng(0)
    texts, images = [], []
    for i, length in enumerate(lengths):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " ".join(rng.choice(words, length))}]}]
        texts.append(processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        images.append(image(*SIZES[i % len(SIZES)], seed=i))
    tok.padding_side = "left"
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512, help="ShareGPT text tokens per request, at most")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady figures on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    processor, model = qwen_processor("qwen2_5_vl"), qwen_model("qwen2_5_vl", **TEXT)
    own = copy.deepcopy(model)  # the baseline's model: never switched to prepack's attention
    batch = workload(processor, args.requests, args.max_len)
    mask = batch["attention_mask"]
    real = int(mask.sum())
    print(f"tiny Qwen2.5-VL fp32 CPU ({args.threads} thread(s)), {args.requests} requests with one image each ({len(SIZES)} sizes), "
          f"{real} tokens, padded batch {tuple(mask.shape)} = {mask.numel()} tokens ({mask.numel() / real:.2f}x)")

    # exactness first: the same last-token argmax and the same generated tokens
    with torch.no_grad():
        padded = own(**batch).logits[:, -1]
    packed = prepack.prefill(model, batch).logits
    assert torch.equal(packed.argmax(-1), padded.argmax(-1)), "prefill: last-token argmax differs from the padded batch"
    gen_kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False)
    mine = [g.tokens for g in prepack.generate(model, batch, **gen_kwargs)]
    with torch.no_grad():
        theirs = own.generate(**batch, **gen_kwargs)[:, mask.shape[1]:]
    eos = processor.tokenizer.eos_token_id
    for i, (a, b) in enumerate(zip(mine, theirs)):
        b = b.tolist()
        b = b[: b.index(eos) + 1] if eos in b else b
        if a.tolist() != b:
            raise SystemExit(f"request {i}: prepack.generate gives {a.tolist()} but model.generate gives {b}")
    print(f"same tokens: last-token argmax of all {args.requests} requests; {sum(map(len, mine))} generated tokens")

    def run(fns):
        times = time_interleaved(fns, repeat=args.repeat, warmup=1)
        return {k: statistics.median(v) for k, v in times.items()}

    pre = run({"prepack.prefill": lambda: prepack.prefill(model, batch),
               "padded forward": lambda: own(**batch)})
    gen = run({"prepack.generate": lambda: prepack.generate(model, batch, **gen_kwargs),
               "model.generate": lambda: own.generate(**batch, **gen_kwargs)})
    for title, t, ours, base in (("prefill", pre, "prepack.prefill", "padded forward"),
                                 ("generate", gen, "prepack.generate", "model.generate")):
        print(f"{title}: {ours} {t[ours]:.3f} s, {base} {t[base]:.3f} s -> {t[base] / t[ours]:.2f}x (median of {args.repeat})")


if __name__ == "__main__":
    main()
