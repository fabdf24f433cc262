"""Every example runs offline at tiny size and does what its docstring promises."""

import importlib.util
import itertools
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_prefill_and_generate_gives_the_same_tokens_as_model_generate(capsys):
    argv = ["--model", "llama-tiny", "--n", "4", "--new-tokens", "3", "--max-len", "128", "--repeat", "1"]
    assert load("hf_prefill_and_generate").main(argv) == 0
    out = capsys.readouterr().out
    assert "same new tokens for all 4 requests: True" in out
    # the ratio is printed with what it compares, never as a bare "speedup"
    assert "model.generate time / prepack.generate time = " in out and "speedup" not in out


def test_pack_in_datasets_pipeline_keeps_every_token(capsys):
    pytest.importorskip("datasets")
    argv = ["--data", "synthetic:lognormal", "--n", "60", "--capacity", "256", "--map-batch-size", "25"]
    assert load("pack_in_datasets_pipeline").main(argv) == 0
    assert "60 prompts ->" in capsys.readouterr().out


def test_pack_per_batch_emits_boundaries_and_restarting_positions():
    datasets = pytest.importorskip("datasets")
    pack_per_batch = load("pack_in_datasets_pipeline").pack_per_batch
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]})
    rows = pack_per_batch(ds, capacity=5, batch_size=2)
    for ids, pos, cu in zip(rows["input_ids"], rows["position_ids"], rows["cu_seqlens"]):
        assert cu[0] == 0 and cu[-1] == len(ids) <= 5
        assert [p for a, b in itertools.pairwise(cu) for p in range(b - a)] == pos
    assert sorted(len(r) for r in rows["example_ids"]) == [1, 2]
    assert sorted(i for r in rows["example_ids"] for i in r) == [0, 1, 2]


def test_benchmark_padded_vs_packed_writes_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "speedup.png"
    argv = ["--model", "llama-tiny", "--batch-sizes", "1,2", "--max-len", "64", "--repeat", "1", "--out", str(out)]
    assert load("benchmark_padded_vs_packed").main(argv) == 0
    assert out.stat().st_size > 0
    out = capsys.readouterr().out
    assert "| 2 | prefill | prepack |" in out
    assert "batch 2, prefill: padded (sdpa) " in out and "after 1 warm-up round, methods interleaved" in out
