"""Conformance sweep for prompts with images: every image-text-to-text model type in transformers, tiny.

For each type in ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, in fp32 on CPU:

* the families prepack runs with images (``prepack.hf.vision.FAMILIES``) are built with their own processor
  classes (``prepack/tiny_vision.py``) and checked against each request alone: last-token logits of
  ``prepack.prefill`` on 5 chats with 0-2 images (max abs <= 1e-4) and 8 greedy tokens of
  ``prepack.generate`` against ``model.generate`` on each chat alone -> ``exact`` or ``silently wrong``;
* every other type is built tiny from its default config (the generic shrink of ``benchmarks/model_zoo.py``,
  applied to its text and vision configs) and given a processor-style batch with ``pixel_values``: prepack
  must raise its ``UnsupportedModelError`` naming the model -> ``refused``; a type that does not build tiny
  is ``not buildable tiny``.

These rows are separate from ``docs/models.md`` (whose counts, for text prompts, the README quotes): they
are about prompts with images only.

    python benchmarks/vision_zoo.py                 # the sweep -> docs/vision_models.md
    python benchmarks/vision_zoo.py --out -         # to stdout
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOL = 1e-4
NEW_TOKENS = 8
OUTCOMES = ("exact", "refused", "not buildable tiny", "silently wrong", "prepack crash")


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def check_family(model_type: str) -> dict:
    """A supported family against each chat alone: prefill logits and greedy tokens."""
    import torch

    import prepack
    from prepack.tiny_vision import alone, chats, llava_model, llava_processor, qwen_model, qwen_processor

    model, processor = (llava_model(), llava_processor()) if model_type == "llava" else (qwen_model(model_type), qwen_processor(model_type))
    conversations = chats(5)
    outs = [alone(processor, c) for c in conversations]
    with torch.no_grad():
        want = torch.cat([model(**o).logits[:, -1] for o in outs])
    err = float((prepack.prefill(model, conversations, processor=processor).logits - want).abs().max())
    got = prepack.generate(model, conversations, processor=processor, max_new_tokens=NEW_TOKENS)
    same = 0
    for mine, o in zip(got, outs):
        with torch.no_grad():
            ref = model.generate(**o, max_new_tokens=NEW_TOKENS, do_sample=False)[0, o["input_ids"].shape[1]:]
        same += mine.tokens.tolist() == ref.tolist()
    ok = err <= TOL and same == len(outs)
    return {"outcome": "exact" if ok else "silently wrong", "class": type(model).__name__,
            "detail": f"max abs {err:.1e}; greedy tokens {same}/{len(outs)} equal"}


def build_tiny(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from model_zoo import _shrunk_kwargs

    config = AutoConfig.for_model(model_type, **_shrunk_kwargs(AutoConfig.for_model(model_type), {}))
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def check_refused(model_type: str) -> dict:
    """Any other type: built tiny, a batch with pixel_values must be refused naming the model."""
    import torch

    import prepack
    from prepack.hf.support import UnsupportedModelError

    try:
        model = build_tiny(model_type)
    except Exception as e:  # noqa: BLE001 - any failure to build is the row's outcome
        return {"outcome": "not buildable tiny", "class": "", "detail": _short(e)}
    batch = {"input_ids": torch.tensor([[3, 4, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(1, 3, 16, 16)}
    try:
        prepack.prefill(model, batch)
    except UnsupportedModelError as e:
        return {"outcome": "refused", "class": type(model).__name__, "detail": _short(e)}
    except ValueError as e:  # a model without a vision_config: the key it would drop is named
        if "'pixel_values'" in str(e):
            return {"outcome": "refused", "class": type(model).__name__, "detail": _short(e)}
        return {"outcome": "prepack crash", "class": type(model).__name__, "detail": _short(e)}
    except Exception as e:  # noqa: BLE001
        return {"outcome": "prepack crash", "class": type(model).__name__, "detail": _short(e)}
    return {"outcome": "silently wrong", "class": type(model).__name__, "detail": "accepted pixel_values unchecked"}


def _short(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Timeout(Exception):
    pass


def check(model_type: str, timeout: int) -> dict:
    from prepack.hf.vision import FAMILIES

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        row = check_family(model_type) if model_type in FAMILIES else check_refused(model_type)
    except _Timeout:
        row = {"outcome": "not buildable tiny", "class": "", "detail": f"did not build and run within {timeout} s"}
    except Exception as e:  # noqa: BLE001
        row = {"outcome": "prepack crash", "class": "", "detail": _short(e)}
    finally:
        signal.alarm(0)
    return {"type": model_type, **row}


def write_markdown(rows: list[dict], out, command: str, seconds: float) -> None:
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    lines = [
        "# Image-text-to-text models with images",
        "",
        "Generated by `benchmarks/vision_zoo.py` (see `docs/vision.md`); prompts with images only. The same models'",
        "text prompts are rows of `docs/models.md` where they are causal-LM types.",
        "",
        f"    {command}",
        "",
        f"{len(rows)} model types in {seconds:.0f} s: " + ", ".join(f"{n} {o}" for o, n in counts.items()) + ".",
        "",
        "| model type | class | with images | detail |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{r['type']}` | {r['class']} | {r['outcome']} | {r['detail']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if out == "-":
        sys.stdout.write(text)
    else:
        Path(out).write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="these model types only")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per model type")
    ap.add_argument("--out", default=str(ROOT / "docs" / "vision_models.md"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for t in args.only or model_types():
        rows.append(check(t, args.timeout))
        print(f"{t}: {rows[-1]['outcome']}", file=sys.stderr, flush=True)
    write_markdown(rows, args.out, "python benchmarks/vision_zoo.py", time.perf_counter() - start)
    bad = [r["type"] for r in rows if r["outcome"] in ("silently wrong", "prepack crash")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
