"""The model zoo's summary as a picture, drawn from the matrix ``benchmarks/model_zoo.py`` wrote (no re-run).

    python benchmarks/plot_zoo.py [--models-md docs/models.md] --plot docs/img/zoo_summary.png

Three panels from the table of ``docs/models.md``: how many model types had each outcome, what the exact
ones exercise (the ``features`` column), and why the refused ones were refused (their ``detail``, grouped).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

OUTCOMES = ("exact", "refused", "not buildable tiny", "transformers fails", "silently wrong", "prepack crash")
# the reasons prepack gives, grouped by the words of its refusal messages (prepack/hf/support.py, prepack/hf/registration.py)
REASONS = (
    ("no AttentionInterface", re.compile(r"does not route attention through")),
    ("attention kwargs not implemented", re.compile(r"passed attention keyword")),
    ("convolution over tokens", re.compile(r"convolution over tokens")),
    ("cache not plain per-layer KV", re.compile(r"cache has layer types|wrote no keys and values")),
    ("a mask beyond causal (bidirectional, ...)", re.compile(r"attention mask together with a packed layout")),
    ("recurrent / state-space layers", re.compile(r"has recurrent \(state-space")),
    ("sparse attention (indexer, compressor)", re.compile(r"sparse-attention indexer|compressors \(.*would pool")),
)


def read_matrix(text: str) -> list[dict]:
    """docs/models.md -> one dict per model type's row (not the ``type@variant`` rows): type, class, features (list), outcome, detail."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 6 or cells[0] in ("model type", "---") or cells[3] not in OUTCOMES or "@" in cells[0]:
            continue
        features = [f.strip() for f in cells[2].split(",") if f.strip()]
        rows.append(dict(type=cells[0], cls=cells[1], features=features, outcome=cells[3], detail=cells[5]))
    return rows


def refusal_reason(detail: str) -> str:
    return next((name for name, pattern in REASONS if pattern.search(detail)), "other")


def plot_zoo(rows: list[dict], path: str, title: str) -> None:
    """Write the three-panel PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw=dict(width_ratios=[1.1, 1, 1.1]))
    outcomes = Counter(r["outcome"] for r in rows)
    features = Counter(f for r in rows if r["outcome"] == "exact" for f in (r["features"] or ["plain causal"]))
    reasons = Counter(refusal_reason(r["detail"]) for r in rows if r["outcome"] == "refused")
    colours = {"exact": "tab:green", "refused": "tab:orange", "not buildable tiny": "tab:gray",
               "transformers fails": "tab:blue", "silently wrong": "tab:red", "prepack crash": "darkred"}
    panels = (
        (axes[0], list(OUTCOMES), [outcomes[o] for o in OUTCOMES], [colours[o] for o in OUTCOMES],
         f"outcome of {len(rows)} causal-LM model types"),
        (axes[1], list(features), list(features.values()), "tab:green", f"the {outcomes['exact']} exact: features"),
        (axes[2], list(reasons), list(reasons.values()), "tab:orange", f"the {outcomes['refused']} refused: reason"),
    )
    for ax, labels, counts, colour, panel_title in panels:
        order = sorted(range(len(labels)), key=lambda i: counts[i]) if ax is not axes[0] else range(len(labels))[::-1]
        labels, counts = [labels[i] for i in order], [counts[i] for i in order]
        colour = [colour[i] for i in order] if isinstance(colour, list) else colour
        bars = ax.barh(labels, counts, color=colour)
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("model types")
        ax.set_xlim(0, max(counts + [1]) * 1.15)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-md", default="docs/models.md", help="the matrix model_zoo.py wrote")
    ap.add_argument("--plot", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    text = open(args.models_md, encoding="utf-8").read()
    rows = read_matrix(text)
    if not rows:
        raise SystemExit(f"{args.models_md} has no model_zoo.py table rows")
    versions = re.search(r"^- (transformers .*)$", text, re.M)
    plot_zoo(rows, args.plot, f"prepack model zoo ({args.models_md}{', ' + versions.group(1) if versions else ''})")
    print(f"{len(rows)} model types: " + ", ".join(f"{n} {o}" for o, n in Counter(r["outcome"] for r in rows).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
