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


def unpack(rows, capacity: int) -> dict[int, list[int]]:
    """Packed rows -> {example id: its tokens}, cut at cu_seqlens; checks each row's layout on the way."""
    out = {}
    for row in rows:
        ids, cu, pos = row["input_ids"], row["cu_seqlens"], row["position_ids"]
        assert len(cu) == len(row["example_ids"]) + 1 and cu[0] == 0 and cu[-1] == len(ids) <= capacity
        assert pos == [p for a, b in itertools.pairwise(cu) for p in range(b - a)]
        for e, a, b in zip(row["example_ids"], cu[:-1], cu[1:], strict=True):
            assert e not in out  # each example in one row, once
            out[e] = ids[a:b]
    return out


def test_pack_in_datasets_pipeline_keeps_every_token(capsys, monkeypatch):
    pytest.importorskip("datasets")
    example = load("pack_in_datasets_pipeline")
    packings, report = [], example.report

    def spy(name, ds, rows, capacity):  # what main packs, seen where it reports it
        packings.append((ds, rows))
        report(name, ds, rows, capacity)

    monkeypatch.setattr(example, "report", spy)
    argv = ["--data", "synthetic:lognormal", "--n", "60", "--capacity", "256", "--map-batch-size", "25"]
    assert example.main(argv) == 0
    assert capsys.readouterr().out.count("60 prompts ->") == 2
    assert len(packings) == 2  # per map batch, and the whole dataset
    for ds, rows in packings:
        prompts = [list(t) for t in ds["input_ids"]]
        assert len(prompts) == 60
        got = unpack(rows, capacity=256)
        assert sorted(got) == list(range(60))
        assert [got[i] for i in range(60)] == prompts


def test_pack_per_batch_emits_boundaries_and_restarting_positions():
    datasets = pytest.importorskip("datasets")
    pack_per_batch = load("pack_in_datasets_pipeline").pack_per_batch
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]})
    rows = pack_per_batch(ds, capacity=5, batch_size=2)
    for ids, pos, cu in zip(rows["input_ids"], rows["position_ids"], rows["cu_seqlens"], strict=True):
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


def _torchrun(script_args, cwd):
    """``torchrun --nproc_per_node 2 examples/packed_sft_multirank.py ...``: the (step, loss) lines rank 0 prints."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(EXAMPLES.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(EXAMPLES / "packed_sft_multirank.py"), *script_args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line[line.index("{"):]) for line in proc.stdout.splitlines() if '{"step"' in line]
    return {d["step"]: d["loss"] for d in lines}


def test_multirank_packed_sft_resumes_from_a_checkpoint_with_the_uninterrupted_losses(tmp_path):
    import shutil

    whole = _torchrun(["--output-dir", str(tmp_path / "a"), "--max-steps", "4"], tmp_path)
    assert sorted(whole) == [1, 2, 3, 4]
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = _torchrun(["--output-dir", str(tmp_path / "b"), "--max-steps", "4", "--resume"], tmp_path)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - whole[step]) <= 1e-6 * abs(whole[step]), (step, resumed[step], whole[step])


def test_grpo_with_prepack_trains_on_prepack_rollouts_that_match_trl(capsys):
    pytest.importorskip("trl")
    argv = ["--steps", "2", "--prompts", "2", "--generations", "2", "--new-tokens", "6"]
    assert load("grpo_with_prepack").main(argv) == 0
    out = capsys.readouterr().out
    assert "same completions as TRL's own path under top_k=1: True" in out
    gap = float(out.split("largest |rollout logprob - TRL's recomputation|: ")[1].split()[0])
    assert gap <= 1e-5
    assert "step 1: reward" in out and "step 2: reward" in out
