"""The benchmark's results for people: a markdown table and a PNG of speedup against batch size.

Both take the rows of :func:`prepack.bench.run_bench` / :func:`prepack.bench.run_sweep`
as they are; matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def format_table(rows: Sequence[dict]) -> str:
    """Results as a markdown table, one line per (batch size, metric, method).

    ``mem peak MB`` and ``mem growth MB`` are ``mem_peak_mb`` and ``mem_growth_mb``
    of :func:`prepack.bench.run_bench`: peak RSS on CPU, peak allocated on CUDA,
    and how far above the pre-call level that peak went.
    """
    lines = [
        "| batch | metric | method | backend | median s | min–max s | × vs padded | × vs prepack:sdpa_masked "
        "| tokens/s | mem peak MB | mem growth MB | computed/real tokens | same tokens |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['metric']} | {r['method']} | | failed: {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['batch_size']} | {r['metric']} | {r['method']} | {r['backend']} | {r['median_s']:.3f} "
            f"| {r['min_s']:.3f}–{r['max_s']:.3f} | {_ratio(r['speedup'])} | {_ratio(r['speedup_vs_sdpa_masked'])} "
            f"| {r['tokens_per_s']:,.0f} | {r['mem_peak_mb']:,.0f} | {r['mem_growth_mb']:,.0f} "
            f"| {r['pad_ratio']:.2f} | {_pct(r['same_tokens'])} |"
        )
    return "\n".join(lines)


def format_speedups(rows: Sequence[dict], method: str = "prepack", baseline: str = "padded") -> str:
    """One sentence per (batch size, metric): the two medians, their ratio, and how they were measured."""
    by = {(r["batch_size"], r["metric"], r["method"]): r for r in rows if "error" not in r}
    lines = []
    for (b, metric, m), r in by.items():
        base = by.get((b, metric, baseline))
        if m != method or base is None:
            continue
        lines.append(
            f"batch {b}, {metric}: {baseline} ({base['backend']}) {base['median_s']:.3f} s / {method} ({r['backend']}) "
            f"{r['median_s']:.3f} s = {base['median_s'] / r['median_s']:.2f}x "
            f"(median of {_count(r['repeat'], 'call')} each after {_count(r['warmup'], 'warm-up round')}, "
            f"methods interleaved, on {r['device']})"
        )
    return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


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
