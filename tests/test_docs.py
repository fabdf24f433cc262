"""Docs are true: every name docs/api.md and docs/internals.md document exists where it says, every public name
is documented in api.md, and api.md holds public names only, each with an example (run by test_doc_blocks.py).

The convention of both pages, which these tests parse:

* each ``## Title — `prepack/module.py``` section (or ``prepack/package/``) names the module it documents;
* each ``### `name(...)` `` heading in a section names objects of that module, one per backticked span
  (the identifier before any ``(``); ``prepack.name`` also claims that ``prepack.name`` is that object;
* a table right under a class's heading lists its attributes and methods in backticks in its first column.

Besides, every ``prepack.a.b`` reference anywhere in README.md and docs/*.md must resolve.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
INTERNALS = ROOT / "docs" / "internals.md"
# modules whose own names api.md documents (besides ``prepack.NAME``): the public modules not re-exported whole
PUBLIC_MODULES = ("prepack.lm_eval", "prepack.ray_data", "prepack.tiny", "prepack.trl")

SECTION = re.compile(r"^## .*`(prepack/[\w/]*?)(\.py)?`")
ENTRY = re.compile(r"^### ")
SPAN = re.compile(r"`([^`]+)`")
NAME = re.compile(r"^(prepack\.)?([A-Za-z_]\w*)")
REFERENCE = re.compile(r"\bprepack(?:\.[A-Za-z_]\w*)+")


class Entry(NamedTuple):
    name: str
    top_level: bool  # written prepack.name
    line: int
    members: list  # (name, line) from the table under the heading


class Section(NamedTuple):
    module: str
    line: int
    entries: list


def parse_api(text: str) -> tuple[list[Section], list[str]]:
    """docs/api.md -> its module sections, and the lines that break the convention."""
    sections: list[Section] = []
    problems: list[str] = []
    owner: Entry | None = None  # the entry a table belongs to: the first name of the heading above it
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            m = SECTION.match(line)
            if m is None:
                problems.append(f"api.md:{n}: section names no module (`prepack/module.py` or `prepack/package/`): {line!r}")
                owner = None
                continue
            path = m.group(1).rstrip("/")
            sections.append(Section(path.replace("/", "."), n, []))
            owner = None
        elif ENTRY.match(line):
            spans = SPAN.findall(line)
            if not sections or not spans:
                problems.append(f"api.md:{n}: an entry heading must be in a module section and name objects in backticks")
                owner = None
                continue
            entries = []
            for span in spans:
                m = NAME.match(span)
                if m is None:
                    problems.append(f"api.md:{n}: `{span}` does not start with a name")
                    continue
                entries.append(Entry(m.group(2), bool(m.group(1)), n, []))
            sections[-1].entries.extend(entries)
            owner = entries[0] if entries else None
        elif line.startswith("|") and owner is not None:
            first = _first_cell(line)
            if set(first.strip()) <= set("-: "):
                continue  # the header's separator
            for span in SPAN.findall(first):
                m = NAME.match(span)
                if m is None or m.group(1):
                    problems.append(f"api.md:{n}: member `{span}` of {owner.name} is not a plain name")
                    continue
                owner.members.append((m.group(2), n))
    return sections, problems


def _first_cell(row: str) -> str:
    """The first cell of a markdown table row; a ``|`` inside backticks does not end it."""
    inside = False
    for i, ch in enumerate(row[1:], 1):
        if ch == "`":
            inside = not inside
        elif ch == "|" and not inside:
            return row[1:i]
    return row[1:]


def _missing_dependency(e: ImportError) -> str | None:
    """The optional package (not prepack) whose absence caused ``e``, if that is what happened."""
    while e is not None:
        if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("prepack"):
            return e.name
        e = e.__cause__ or e.__context__
    return None


def import_documented(module: str):
    """The module, or a skip when only an optional dependency of it is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"docs/api.md documents module {module}, which does not exist")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = _missing_dependency(e)
        if missing is None:
            raise
        pytest.skip(f"{module} needs the optional package {missing}")


def has_member(cls: type, name: str) -> bool:
    """A class attribute, property or method; a dataclass or NamedTuple field; or an attribute ``__init__`` sets."""
    if hasattr(cls, name):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    if name in getattr(cls, "_fields", ()):
        return True
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return re.search(rf"\bself\.{re.escape(name)}\b\s*(=[^=]|:|,)", source) is not None


def check_section(section: Section, module) -> list[str]:
    """Every entry exists in ``module`` (and in ``prepack`` when written so), every class member on its class."""
    import prepack

    problems = []
    for e in section.entries:
        where = f"api.md:{e.line}"
        if not hasattr(module, e.name):
            problems.append(f"{where}: {section.module} has no {e.name}")
            continue
        obj = getattr(module, e.name)
        if e.top_level:
            if e.name not in prepack.__all__ or getattr(prepack, e.name, None) is not obj:
                problems.append(f"{where}: prepack.{e.name} is documented but is not {section.module}.{e.name} in prepack.__all__")
        elif e.name in prepack.__all__ and getattr(prepack, e.name) is obj:
            problems.append(f"{where}: {e.name} is public: write it as `prepack.{e.name}`")
        if e.members and not inspect.isclass(obj):
            problems.append(f"{where}: {e.name} is not a class, but a table lists members under it")
            continue
        for name, line in e.members:
            if not has_member(obj, name):
                problems.append(f"api.md:{line}: {section.module}.{e.name} has no attribute or method {name}")
    return problems


def undocumented(sections: list[Section], module_name: str, module) -> list[str]:
    """Names in ``module.__all__`` that no heading documents (for ``prepack``: as ``prepack.NAME``)."""
    if module_name == "prepack":
        documented = {e.name for s in sections for e in s.entries if e.top_level}
    else:
        documented = {e.name for s in sections if s.module == module_name for e in s.entries}
    return sorted(set(getattr(module, "__all__", ())) - documented)


def resolves(reference: str) -> bool | str:
    """Whether ``prepack.a.b`` names something; the missing optional package's name when that decides."""
    parts = reference.split(".")
    obj = importlib.import_module(parts[0])
    path = parts[0]
    for part in parts[1:]:
        path += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if not inspect.ismodule(obj) or importlib.util.find_spec(path) is None:
            return False
        try:
            obj = importlib.import_module(path)
        except ImportError as e:
            missing = _missing_dependency(e)
            if missing is None:
                raise
            return missing
    return True


PUBLIC_SECTIONS, PUBLIC_PROBLEMS = parse_api(API.read_text(encoding="utf-8"))
INTERNAL_SECTIONS, INTERNAL_PROBLEMS = parse_api(INTERNALS.read_text(encoding="utf-8"))
SECTIONS, PROBLEMS = PUBLIC_SECTIONS + INTERNAL_SECTIONS, PUBLIC_PROBLEMS + [f"internals.md: {p}" for p in INTERNAL_PROBLEMS]


def test_api_md_follows_the_convention():
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert len(SECTIONS) >= 20 and all(s.entries for s in SECTIONS), "every module section documents names"


def test_api_md_documents_public_names_only():
    internal = [f"api.md:{e.line}: {s.module}.{e.name}" for s in PUBLIC_SECTIONS for e in s.entries
                if not e.top_level and s.module not in PUBLIC_MODULES]
    assert not internal, "internal names belong in docs/internals.md:\n" + "\n".join(internal)


def test_every_api_md_entry_has_an_example():
    lines = API.read_text(encoding="utf-8").splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("### ")]
    bare = []
    for i in heads:
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("#")), len(lines))
        if not any(line.startswith("```python") for line in lines[i:end]):
            bare.append(f"api.md:{i + 1}: {lines[i]}")
    assert not bare, "entries without a ```python example:\n" + "\n".join(bare)


@pytest.mark.parametrize("section", SECTIONS, ids=[s.module for s in SECTIONS])
def test_every_name_api_md_documents_exists(section):
    module = import_documented(section.module)
    problems = check_section(section, module)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module_name", ["prepack", "prepack.bench"])
def test_every_public_name_is_documented_in_api_md(module_name):
    missing = undocumented(SECTIONS, module_name, importlib.import_module(module_name))
    how = "as `prepack.NAME` headings" if module_name == "prepack" else f"in the `{module_name.replace('.', '/')}/` section"
    assert not missing, f"{module_name}.__all__ names missing from docs/api.md ({how}): {missing}"


def test_every_prepack_reference_in_the_docs_resolves():
    bad = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for ref in REFERENCE.findall(line):
                if resolves(ref) is False:  # True, or the optional package it needs is not installed
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
    assert not bad, "references to names that do not exist:\n" + "\n".join(bad)


# The checks themselves, on a small page: they must be able to fail.

BAD_PAGE = """\
# API

## Planning — `prepack/planner/bins.py`

### `prepack.plan(lengths)`, `no_such_function(x)`

### `prepack.Plan`

| attribute | meaning |
|---|---|
| `lengths`, `row` | fields |
| `no_such_attribute` | missing |

### `check_capacity(capacity)`

| attribute | meaning |
|---|---|
| `real` | a table under a function |

## Packing — `prepack/data/batch.py`

### `PackedBatch`, `prepack.pack_plan(p, tokens)`

## Missing — `prepack/no_such_module.py`

### `anything`

## No module named here
"""


def test_the_checks_catch_missing_names_members_modules_and_public_names():
    import prepack

    sections, problems = parse_api(BAD_PAGE)
    assert problems == ["api.md:28: section names no module (`prepack/module.py` or `prepack/package/`): '## No module named here'"]
    planner, packing, missing = sections
    found = check_section(planner, importlib.import_module("prepack.planner.bins"))
    assert found == [
        "api.md:5: prepack.planner.bins has no no_such_function",
        "api.md:12: prepack.planner.bins.Plan has no attribute or method no_such_attribute",
        "api.md:14: check_capacity is not a class, but a table lists members under it",
    ]
    found = check_section(packing, importlib.import_module("prepack.data.batch"))
    assert found == [
        "api.md:22: PackedBatch is public: write it as `prepack.PackedBatch`",
        "api.md:22: prepack.pack_plan is documented but is not prepack.data.batch.pack_plan in prepack.__all__",
    ]
    assert importlib.util.find_spec(missing.module) is None
    assert "generate" in undocumented(sections, "prepack", prepack)
    assert resolves("prepack.bench.prompts.sample_lengths") is True
    assert resolves("prepack.prompts.sample_lengths") is False
    assert resolves("prepack.PrefillResult.caches") is False


SUMMARY = re.compile(
    r"\*\*Summary: (?P<exact>\d+) exact / (?P<prefill>\d+) exact prefill / (?P<refused>\d+) refused / (?P<tiny>\d+) not buildable tiny / "
    r"(?P<fails>\d+) transformers fails / (?P<wrong>\d+) silently wrong / (?P<crash>\d+) prepack crash "
    r"\(of (?P<total>\d+) causal-LM model types\)\.\*\*"
)


def readme_model_claims(summary: dict) -> list[str]:
    """What README.md says about the model matrix, rendered from docs/models.md's summary line."""
    s = {k: int(v) for k, v in summary.items()}
    prefill_only = f"{s['prefill']} exact for prefill only (generate refused), " if s["prefill"] else ""
    return [
        f"of transformers' {s['total']} causal-LM types, {s['exact']} exact (prefill, caches and generated tokens), "
        f"{prefill_only}{s['refused']} refused with a reason, "
        f"{s['tiny']} not buildable tiny, {s['fails']} failing in transformers itself, {s['wrong']} silently wrong",
    ]


def test_readme_model_counts_are_the_models_md_summary():
    summary = SUMMARY.search((ROOT / "docs" / "models.md").read_text(encoding="utf-8"))
    assert summary is not None, "docs/models.md has no summary line in the form model_zoo.py writes"
    # README says every checked type is exact or refused
    assert summary["wrong"] == summary["crash"] == "0", f"docs/models.md: {summary.group(0)}"
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # line breaks do not matter
    missing = [claim for claim in readme_model_claims(summary.groupdict()) if claim not in readme]
    assert not missing, "README.md's model counts differ from docs/models.md's summary; README should say:\n" + "\n".join(missing)
