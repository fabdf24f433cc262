"""Docs are runnable: every ```python block of README.md and docs/*.md runs, in order, file by file.

Each file's blocks share one namespace, which starts empty: a page builds what it uses, from the package
(``prepack.tiny``'s offline model and tokenizer, ``prepack.tiny_vision``'s vision-language ones) or written
out, so every snippet runs as a reader copies it; a checkpoint a page loads by name is answered by
``prepack.tiny``'s model saved under that name. A block written as
an interactive session (``>>>`` lines) is run as a doctest, so its printed results are checked too.

A block that cannot run here (a GPU, a cluster, a signature rather than code) says so in the markdown,
on the line right before its fence: ``<!-- not run: the reason -->``. ``NOT_RUN`` below lists those
blocks; marking another one means adding it there, with its reason visible in the docs.
"""

from __future__ import annotations

import doctest
import json
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest

import prepack
import prepack.tiny

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*not run\b:?\s*(.*?)\s*-->\s*$")

# (file, first line of code) of every block marked not run; the reason is in the markdown.
NOT_RUN = {
    ("docs/data_pipeline.md", "import ray"),  # a Ray cluster, S3 and a CUDA GPU
    ("docs/data_pipeline.md", "class PackedTrainer(Trainer):"),  # torchrun; examples/packed_sft_multirank.py runs it
    ("docs/scoring.md", "prepack.forward_at(model, sequences, positions=\"last\" | \"all\" | [(start, end), ...],"),
    ("docs/api.md", "vision_collate = prepack.DataCollatorForPackedVisionRows(vlm)   # vlm: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA"),
    ("docs/api.md", "import ray"),  # starts Ray (tests/test_ray_data.py runs both stages)
}


class Block(NamedTuple):
    path: str  # relative to the repository root
    line: int  # 1-based line of the first line of code
    code: str
    not_run: str | None  # the reason given by the marker, "" when the marker gives none; None when it runs


def parse_blocks(path: str, text: str) -> list[Block]:
    """The ```python blocks of one markdown file, in order, with the not-run marker above each, if any."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: a code fence that is never closed")
        if m.group(1) == "python":
            mark = MARK.match(lines[i - 1]) if i > 0 else None
            blocks.append(Block(path, i + 2, "\n".join(lines[i + 1:end]) + "\n", mark.group(1) if mark else None))
        i = end + 1
    return blocks


def all_blocks() -> dict[str, list[Block]]:
    out = {}
    for p in DOCS:
        rel = str(p.relative_to(ROOT))
        blocks = parse_blocks(rel, p.read_text(encoding="utf-8"))
        if blocks:
            out[rel] = blocks
    return out


BLOCKS = all_blocks()


def run_block(block: Block, namespace: dict) -> None:
    """Execute one block in ``namespace``; a ``>>>`` block as a doctest whose failures raise."""
    if block.code.lstrip().startswith(">>>"):
        run_session(block, namespace)
    else:
        # blank lines in front, so that a traceback names the markdown file's own line numbers
        exec(compile("\n" * (block.line - 1) + block.code, block.path, "exec"), namespace)


def run_session(block: Block, namespace: dict) -> None:
    """A ``>>>`` block: each example's output, warnings included (``Category: message``), must read as written."""
    test = doctest.DocTestParser().get_doctest(block.code, namespace, block.path, block.path, block.line - 1)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)

    def show(message, category, *args, **kwargs):
        print(f"{category.__name__}: {message}", file=sys.stdout)  # doctest's captured stdout at call time

    report = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        runner.run(test, out=report.append, clear_globs=False)
    namespace.update(test.globs)  # the DocTest ran on a copy; later blocks see what the session defined
    if runner.failures:
        raise AssertionError("".join(report))


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    """A fresh namespace and working directory (a temporary one): each file's blocks build what they use
    (``prepack.tiny``'s model, say), so nothing here comes from tests/; only the data files a page loads are written."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    texts = ["hello world how are you today", "the quick brown fox jumps over the lazy dog",
             "a user asks a question", "packing prompts removes the padding from the prefill"]
    # docs/data_pipeline.md loads these two files
    for name, rows in (("train.jsonl", texts), ("test.jsonl", texts[:2])):
        Path(name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return {"__name__": "__docs__"}


CHECKPOINT = re.compile(r"""^\s*name = ["']([^"']+)["']""", re.M)


def stand_in_checkpoints(blocks: list[Block]) -> list[str]:
    """The checkpoint names a file's blocks load (``name = "org/model"``, then ``from_pretrained(name)``): each is
    answered offline by :mod:`prepack.tiny`'s model and tokenizer, saved under that name in the working directory
    (``from_pretrained`` reads an existing directory before it would look for a download)."""
    names = sorted({n for b in blocks if b.not_run is None for n in CHECKPOINT.findall(b.code)})
    for name in names:
        prepack.tiny.save_tiny_model(name)
    return names


@pytest.mark.parametrize("path", sorted(p for p, blocks in BLOCKS.items() if any(b.not_run is None for b in blocks)))
def test_every_python_block_of_the_file_runs_in_order(path, namespace):
    stand_in_checkpoints(BLOCKS[path])
    for block in BLOCKS[path]:
        if block.not_run is None:
            run_block(block, namespace)


def test_the_readme_quickstart_loads_a_checkpoint_by_name_and_prints_text(namespace, capsys):
    assert stand_in_checkpoints(BLOCKS["README.md"]) == ["Qwen/Qwen2.5-0.5B-Instruct"]
    quickstart = next(b for b in BLOCKS["README.md"] if "from_pretrained(name)" in b.code)
    fresh = {"__name__": "__docs__"}  # nothing from the fixture: the block defines all it uses
    run_block(quickstart, fresh)
    printed = [line.split(" ", 2) for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [p[0] for p in printed] == ["0", "1"] and all(p[1] in ("eos", "length") for p in printed)


def test_the_blocks_not_run_are_marked_with_a_reason_and_listed():
    marked = [b for blocks in BLOCKS.values() for b in blocks if b.not_run is not None]
    without_reason = [f"{b.path}:{b.line}" for b in marked if not b.not_run]
    assert not without_reason, f"blocks marked not run without a reason: {without_reason}"
    found = {(b.path, b.code.splitlines()[0]) for b in marked}
    assert found == NOT_RUN, "the not-run blocks differ from NOT_RUN: update one or the other"


def test_python_blocks_are_found_in_readme_and_docs():
    assert {"README.md", "docs/data_pipeline.md", "docs/scoring.md"} <= set(BLOCKS)
    assert sum(len(b) for b in BLOCKS.values()) >= 10


# The machinery itself, on a small page: it must be able to fail.

PAGE = """\
text
```python
x = 1
```
<!-- not run: needs a CUDA GPU -->
```python
torch.zeros(1, device="cuda")
```
<!-- not run -->
```python
y = 2
```
```bash
echo not python
```
```python
>>> x + 1
2
>>> import warnings; warnings.warn("careful")
UserWarning: careful
```
"""


def test_the_parser_finds_blocks_lines_and_markers():
    blocks = parse_blocks("page.md", PAGE)
    assert [(b.line, b.not_run) for b in blocks] == [(3, None), (7, "needs a CUDA GPU"), (11, ""), (17, None)]
    assert blocks[0].code == "x = 1\n"
    with pytest.raises(ValueError, match="page.md:1: a code fence that is never closed"):
        parse_blocks("page.md", "```python\nx = 1\n")


def test_a_failing_block_fails_and_a_session_checks_its_output_and_warnings():
    first, _, _, session = parse_blocks("page.md", PAGE)
    ns = {}
    run_block(first, ns)
    run_session(session, ns)  # the warning is shown as the page writes it
    with pytest.raises(NameError):
        run_block(Block("page.md", 1, "undefined_name\n", None), {})
    with pytest.raises(AssertionError, match="Expected:\n    4"):
        run_session(Block("page.md", 1, ">>> 1 + 2\n4\n", None), {})
