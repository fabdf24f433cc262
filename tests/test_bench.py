"""``prepack bench`` (the ``prepack.bench`` package) and the prompt loaders behind it, at tiny size."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from prepack import bench
from prepack.bench.prompts import (
    fit_vocab,
    load_prompts,
    read_jsonl,
    read_jsonl_datasets,
    read_text,
    select_prompts,
    source_prompts,
    synthetic_lognormal,
)


@pytest.fixture(scope="module")
def tiny():
    return bench.build_model("llama-tiny")


# --- prompts --------------------------------------------------------------------------------------

def test_read_jsonl_accepts_token_lists_input_ids_and_text(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('[1, 2, 3]\n{"input_ids": [4, 5]}\n\n{"text": "hello"}\n')
    assert read_jsonl(str(f)) == [[1, 2, 3], [4, 5], "hello"]


def test_read_jsonl_names_the_line_of_a_bad_record(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('[1, 2]\n{"tokens": [1]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected 'input_ids' or 'text'"):
        read_jsonl(str(f))


def test_read_jsonl_reads_lengths_and_token_lists_as_lengths_for_prepack_plan(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('5\n[1, 2, 3]\n{"input_ids": [4]}\n')
    assert read_jsonl(str(f), lengths=True) == [5, 3, 1]


def test_prepack_plan_reads_lengths_with_the_same_jsonl_reader_and_errors(tmp_path, capsys):
    from prepack.cli.commands import main

    f = tmp_path / "p.jsonl"
    f.write_text('[1, 2]\n{"tokens": [1]}\n')
    with pytest.raises(SystemExit) as exit:
        main(["plan", str(f)])
    assert exit.value.code == 2
    assert "prepack plan: error: " in (err := capsys.readouterr().err) and "p.jsonl:2: expected 'input_ids' or 'text'" in err


def test_read_jsonl_datasets_matches_the_plain_reader(tmp_path):
    pytest.importorskip("datasets")
    f = tmp_path / "p.jsonl"
    f.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4]}\n')
    assert read_jsonl_datasets(str(f)) == read_jsonl(str(f)) == [[1, 2, 3], [4]]


def test_text_file_prompts_are_tokenized_with_cl100k_and_blank_lines_count_as_empty(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Hello world\n\nWhy is the sky blue?\n")
    assert read_text(str(f)) == ["Hello world", "", "Why is the sky blue?"]
    ids = source_prompts(str(f), vocab_size=100352, n=3)
    assert ids[0] == [9906, 1917] and ids[1] == []


def test_select_prompts_counts_empty_and_skipped_long_prompts():
    pool = [[1] * 5, [], [2] * 50, [3] * 7, [], [4] * 60]
    ps = select_prompts(pool, 2, max_len=10, on_long="skip")
    assert sorted(len(t) for t in ps.token_ids) == [5, 7]
    # the sample order is random, but every prompt read is either kept or counted
    assert ps.num_read == 2 + ps.num_empty + ps.num_long
    assert f"{ps.num_empty} empty skipped; {ps.num_long} over --max-len 10 skipped" in ps.summary()


def test_select_prompts_truncates_long_prompts_to_max_len_when_asked():
    ps = select_prompts([[7] * 50], 1, max_len=10, on_long="truncate")
    assert ps.token_ids == ([7] * 10,) and ps.num_long == 1
    assert "1 over --max-len 10 truncated to 10" in ps.summary()


def test_select_prompts_says_how_many_were_usable_when_the_pool_runs_out():
    with pytest.raises(ValueError, match=r"only 1 usable prompts but 2 were asked for \(1 empty, 1 over max_len 10 skipped\)"):
        select_prompts([[1, 2], [], [3] * 20], 2, max_len=10)


def test_fit_vocab_folds_ids_with_modulo_only_when_needed():
    assert fit_vocab([[1, 2]], 10) == ([[1, 2]], False)
    assert fit_vocab([[1, 12, 25]], 10) == ([[1, 2, 5]], True)


def test_synthetic_lognormal_is_seeded_nonempty_and_in_vocab():
    a = synthetic_lognormal(100, vocab_size=50, seed=3)
    assert a == synthetic_lognormal(100, vocab_size=50, seed=3)
    assert min(len(t) for t in a) >= 1 and max(max(t) for t in a) < 50
    assert 10 < np.median([len(t) for t in a]) < 200  # ShareGPT-like: tens of tokens, long tail


def test_sharegpt_prompts_fit_the_small_presets_vocab_unchanged():
    ps = load_prompts("sharegpt", 32, vocab_size=100352)
    assert len(ps) == 32 and not ps.vocab_mapped
    assert len(ps.lengths) > 10_000  # the histogram sees the whole source


# --- the bench API --------------------------------------------------------------------------------

def test_computed_tokens_counts_padding_per_method():
    lengths = [1, 2, 3, 10]
    assert bench.computed_tokens("padded", lengths) == 40
    assert bench.computed_tokens("sorted", lengths, micro_batch=2) == 2 * 2 + 2 * 10
    assert bench.computed_tokens("prepack:sdpa_masked", lengths) == 20  # [10] and [3, 2, 1] in rows of 10
    assert bench.computed_tokens("prepack", lengths) == 16
    assert bench.computed_tokens("prepack:sdpa_varlen", lengths) == 16


def test_unknown_method_lists_the_methods_and_the_prepack_backends(tiny):
    with pytest.raises(ValueError, match=r"unknown method 'prepack-dense'; choose padded, .*prepack:<backend> .*sdpa_masked"):
        bench.run_bench(tiny, [[1, 2]], methods=("padded", "prepack-dense"))


def test_each_row_names_the_attention_backend_that_ran(tiny):
    rows = bench.run_bench(tiny, [[1, 2, 3], [4]], methods=("padded", "prepack", "prepack:sdpa_masked", "prepack:reference"),
                           repeat=1, warmup=0)
    assert {r["method"]: r["backend"] for r in rows} == {
        "padded": "sdpa",  # the model's own attn_implementation
        "prepack": "sdpa_varlen",  # what backend="auto" resolves to on CPU
        "prepack:sdpa_masked": "sdpa_masked",
        "prepack:reference": "reference",
    }


def test_generate_rows_name_the_backend_the_decode_engine_ran(tiny):
    rows = bench.run_bench(tiny, [[1, 2, 3], [4, 5]], metrics=("generate",), new_tokens=2,
                           methods=("padded", "prepack:reference"), repeat=1, warmup=0)
    assert {r["method"]: r["backend"] for r in rows} == {"padded": "sdpa", "prepack:reference": "reference"}


def test_the_row_backend_prefills_but_does_not_decode():
    assert bench.supports("prepack:sdpa_masked", "prefill") and not bench.supports("prepack:sdpa_masked", "generate")


def test_generate_with_backends_reports_the_engines_backend(tiny):
    from prepack.jobs.generation import generate_with_backends

    ran = generate_with_backends(tiny, [[1, 2, 3], [4, 5], [6]], backend="reference", max_new_tokens=1)
    assert len(ran.results) == 3 and ran.backends == ("reference",)


def test_check_agreement_names_the_request_and_both_methods():
    with pytest.raises(bench.BenchMismatch, match=r"request 1: prepack predicts next token 9 but padded predicts 5"):
        bench.check_agreement({"padded": torch.tensor([3, 5]), "prepack": torch.tensor([3, 9])}, "prefill")


def test_every_method_agrees_on_the_next_token_and_gets_a_speedup_row(tiny):
    prompts = synthetic_lognormal(5, vocab_size=tiny.config.vocab_size, seed=1)
    rows = bench.run_bench(tiny, prompts, metrics=("prefill",), methods=bench.METHODS, repeat=1, warmup=0)
    # hf-cb has no prefill-only entry point, so it sits this metric out
    assert [r["method"] for r in rows] == ["padded", "sorted", "prepack:sdpa_masked", "prepack", "hf-packed-nocache"]
    assert rows[0]["speedup"] == 1.0
    assert all(r["median_s"] > 0 and r["speedup"] > 0 and r["pad_ratio"] >= 1 for r in rows)


def test_generate_metric_compares_whole_outputs(tiny):
    prompts = synthetic_lognormal(4, vocab_size=tiny.config.vocab_size, seed=2)
    rows = bench.run_bench(tiny, prompts, metrics=("generate",), methods=("padded", "sorted", "prepack"),
                           repeat=1, warmup=0, new_tokens=3, micro_batch=2)
    assert [r["same_tokens"] for r in rows] == [1.0, 1.0, 1.0]


def test_run_bench_refuses_an_empty_prompt(tiny):
    with pytest.raises(ValueError, match="request 1 is empty"):
        bench.run_bench(tiny, [[1, 2], []])


def test_run_bench_aborts_when_a_method_disagrees(tiny, monkeypatch):
    def wrong(model, call):
        return bench.Outcome(torch.zeros(len(call.prompts), dtype=torch.long) + 7, None, "none")

    monkeypatch.setitem(bench.METHOD_FNS, "sorted", wrong)
    with pytest.raises(bench.BenchMismatch, match=r"request \d+: sorted predicts next token 7"):
        bench.run_bench(tiny, [[1, 2, 3], [4, 5]], methods=("padded", "sorted"), repeat=1)


# --- memory --------------------------------------------------------------------------------------

def test_memory_meter_counts_a_200mb_tensor_on_cpu():
    mem = bench.measure_memory(lambda: float(torch.ones(50 * 2**20)[0]), torch.device("cpu"))  # 200 MiB, written
    assert mem.growth >= 150 * 2**20 and mem.peak >= mem.growth


def test_a_method_that_allocates_200mb_reports_at_least_150mb_on_repeated_calls(tiny, monkeypatch):
    def padded_plus_200mb(model, call):
        # 1 MiB pieces come from glibc's heap, which keeps them after the first call:
        # unless the meter hands them back to the OS before each call, later calls read ~0.
        pieces = [torch.ones(2**18) for _ in range(200)]
        outcome = bench.METHOD_FNS["padded"](model, call)
        del pieces
        return outcome

    monkeypatch.setitem(bench.METHOD_FNS, "sorted", padded_plus_200mb)
    rows = bench.run_bench(tiny, [[1, 2, 3], [4, 5]], methods=("padded", "sorted"), repeat=2, warmup=1)
    assert rows[1]["method"] == "sorted" and rows[1]["mem_meter"] == "rss"
    assert rows[1]["mem_growth_mb"] >= 150


def test_format_table_has_one_line_per_row(tiny):
    rows = bench.run_bench(tiny, [[1, 2, 3], [4]], methods=("padded", "prepack"), repeat=1, warmup=0)
    table = bench.format_table(rows).splitlines()
    assert len(table) == 4 and table[3].startswith("| 2 | prefill | prepack | sdpa_varlen |")


# --- the CLI --------------------------------------------------------------------------------------

def test_cli_bench_writes_json_and_plot(tmp_path, capsys):
    from prepack.cli.commands import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main([
        "bench", "--model", "llama-tiny", "--data", "synthetic:lognormal", "--batch-sizes", "1,3",
        "--metric", "prefill,ttft", "--methods", "padded,prepack", "--repeat", "1", "--warmup", "0",
        "--threads", "1", "--json", str(out), "--plot", str(png), "--no-progress",
    ])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batch_size"], r["metric"], r["method"]) for r in rows} == {
        (b, m, x) for b in (1, 3) for m in ("prefill", "ttft") for x in ("padded", "prepack")
    }
    assert png.stat().st_size > 0
    assert "| 3 | ttft | prepack |" in capsys.readouterr().out


def test_cli_bench_reads_a_jsonl_file_and_reports_what_it_dropped(tmp_path, capsys):
    from prepack.cli.commands import main

    f = tmp_path / "p.jsonl"
    f.write_text("[1, 2, 3]\n[]\n" + json.dumps(list(range(100))) + "\n[5, 6]\n")
    code = main(["bench", "--model", "llama-tiny", "--data", str(f), "--batch-size", "2", "--max-len", "50",
                 "--methods", "padded,prepack", "--repeat", "1", "--warmup", "0", "--no-progress"])
    assert code == 0
    assert "1 empty skipped; 1 over --max-len 50 skipped" in capsys.readouterr().err


def test_cli_bench_refuses_the_old_dense_method_name(capsys):
    from prepack.cli.commands import main

    with pytest.raises(SystemExit):
        main(["bench", "--model", "llama-tiny", "--methods", "padded,prepack-dense"])
    assert "argument --methods: item 'prepack-dense' of 'padded,prepack-dense': unknown" in capsys.readouterr().err


def test_python_dash_m_prepack_bench_help_runs():
    out = subprocess.run([sys.executable, "-m", "prepack", "bench", "--help"], capture_output=True, text=True, check=True)
    assert "--on-long" in out.stdout and "--batch-sizes" in out.stdout


def test_continuous_batching_runs_after_prepack_switched_the_model(tiny):
    """generate_batch refuses a prepack|<own> implementation; the hf-cb method hands it the model's own."""
    prompts = synthetic_lognormal(4, vocab_size=tiny.config.vocab_size, seed=3)
    rows = bench.run_bench(tiny, prompts, metrics=("ttft",), methods=("prepack", "hf-cb", "prepack:sdpa_masked"), repeat=1, warmup=0)
    assert [r["method"] for r in rows] == ["prepack", "hf-cb", "prepack:sdpa_masked"]
    assert [r.get("error") for r in rows] == [None, None, None]
