"""The ``prepack`` command's contract: a wrong flag value is refused before any work, as argparse refuses it.

Every bad invocation ends with ``prepack <cmd>: error: ...`` on stderr, exit status 2
and no traceback, before a model is built. The CLI runs in-process (``main([...])``).
"""

import json
import logging

import pytest
import torch

from prepack import bench
from prepack.cli.commands import build_parser, main


@pytest.fixture
def files(tmp_path):
    """Paths of small inputs: good lengths, a bad JSONL record, an empty file, a folder, two prompts."""
    (tmp_path / "lengths.txt").write_text("3\n5\n7\n")
    (tmp_path / "bad.jsonl").write_text('[1, 2]\n{"tokens": [1]}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "two.jsonl").write_text("[1, 2, 3]\n[4, 5]\n")
    (tmp_path / "folder").mkdir()
    return {
        "LENGTHS": str(tmp_path / "lengths.txt"), "BAD": str(tmp_path / "bad.jsonl"), "EMPTY": str(tmp_path / "empty.txt"),
        "TWO": str(tmp_path / "two.jsonl"), "DIR": str(tmp_path / "folder"), "MISSING": str(tmp_path / "missing.jsonl"),
        "NODIR": str(tmp_path / "no" / "such" / "out.json"),
    }


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test, with a traceback the table would catch, if a case gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a bad invocation built a model before failing")

    monkeypatch.setattr(bench, "build_model", refuse)


BAD_INVOCATIONS = [
    # (argv, a fragment of the error); LENGTHS, BAD, ... are replaced by the files above
    (["plan", "MISSING"], "no such file"),
    (["plan", "DIR"], "is a directory"),
    (["plan", "BAD"], "bad.jsonl:2: expected 'input_ids' or 'text'"),
    (["plan", "EMPTY"], "no lengths found"),
    (["plan", "LENGTHS", "--capacity", "0"], "argument --capacity: expected an integer >= 1, got 0"),
    (["plan", "LENGTHS", "--capacity", "-5"], "argument --capacity: expected an integer >= 1, got -5"),
    (["plan", "LENGTHS", "--capacity", "4"], "request 1 has 5 tokens but capacity is 4"),
    (["plan", "LENGTHS", "--algorithms", "bfd,xyz"], "argument --algorithms: item 'xyz' of 'bfd,xyz': unknown 'xyz'"),
    (["plan", "LENGTHS", "--max-per-row", "0"], "argument --max-per-row: expected an integer >= 1, got 0"),
    (["plan", "LENGTHS", "--algorithms", "bfd,binpacking", "--max-per-row", "2"], "'binpacking' does not support it"),
    (["plan", "LENGTHS", "--binpacking-limit", "-1"], "argument --binpacking-limit: expected an integer >= 0"),
    (["bench", "--batch-size", "-3"], "argument --batch-size: expected an integer >= 1, got -3"),
    (["bench", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["bench", "--batch-size", "two"], "argument --batch-size: expected an integer >= 1, got 'two'"),
    (["bench", "--batch-sizes", "2,0"], "argument --batch-sizes: item '0' of '2,0': expected an integer >= 1"),
    (["bench", "--batch-sizes", "2,,4"], "argument --batch-sizes: expected a comma-separated list with no empty items"),
    (["bench", "--batch-sizes", "4,4"], "argument --batch-sizes: '4,4' lists '4' twice"),
    (["bench", "--batch-size", "2", "--batch-sizes", "2,4"], "give --batch-size or --batch-sizes, not both"),
    (["bench", "--repeat", "0"], "argument --repeat: expected an integer >= 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    (["bench", "--max-len", "0"], "argument --max-len: expected an integer >= 1, got 0"),
    (["bench", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["bench", "--threads", "-1"], "argument --threads: expected an integer >= 1, got -1"),
    (["bench", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["bench", "--new-tokens", "0", "--metric", "generate"], "argument --new-tokens: expected an integer >= 1, got 0"),
    (["bench", "--new-tokens", "3"], "--new-tokens applies to --metric generate only"),
    (["bench", "--model", "llama-huge"], "argument --model: unknown model 'llama-huge'; choose a preset (llama-tiny"),
    (["bench", "--model", "DIR"], "has no config.json"),
    (["bench", "--data", "MISSING"], "argument --data: no such file"),
    (["bench", "--data", "datasets:MISSING"], "argument --data: no such file"),
    (["bench", "--data", "synthetic:uniform"], "unknown synthetic distribution 'synthetic:uniform'"),
    (["bench", "--model", "llama-tiny", "--data", "BAD"], "--data BAD: BAD:2: expected 'input_ids' or 'text'"),
    (["bench", "--model", "llama-tiny", "--data", "TWO", "--batch-size", "3"], "has only 2 usable prompts but 3 were asked for"),
    (["bench", "--tokenizer", "MISSING"], "argument --tokenizer: no such directory"),
    (["bench", "--tokenizer", "DIR", "--data", "synthetic:lognormal"], "there is nothing to tokenize"),
    (["bench", "--device", "tpu7"], "argument --device: not a torch device: 'tpu7'"),
    (["bench", "--metric", "prefill,xyz"], "argument --metric: item 'xyz' of 'prefill,xyz': unknown 'xyz'"),
    (["bench", "--methods", "padded,prepack-dense"], "argument --methods: item 'prepack-dense' of 'padded,prepack-dense'"),
    (["bench", "--methods", "padded,prepack:xyz"], "argument --methods: item 'prepack:xyz'"),
    (["bench", "--json", "NODIR"], "argument --json: the folder of"),
    (["bench", "--plot", "DIR"], "argument --plot:"),
]
if not torch.cuda.is_available():
    BAD_INVOCATIONS.append((["bench", "--device", "cuda"], "argument --device: 'cuda': this torch build"))


@pytest.mark.parametrize("argv, fragment", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_a_bad_invocation_exits_2_with_an_argparse_error_and_no_traceback(argv, fragment, files, no_model, capsys):
    argv = [files.get(a, a.replace("MISSING", files["MISSING"])) for a in argv]
    fragment = fragment.replace("BAD", files["BAD"])
    with pytest.raises(SystemExit) as exit:
        main(argv + (["--no-progress"] if argv[0] == "bench" else []))
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert f"prepack {argv[0]}: error: " in err
    assert fragment in err
    assert "Traceback" not in err


# --- plan ------------------------------------------------------------------------------------------

def test_plan_exits_1_and_still_prints_every_row_when_an_algorithm_fails(files, monkeypatch, capsys):
    import prepack.cli.commands

    real = prepack.cli.commands.plan

    def ffd_breaks(lengths, capacity, *, algorithm="bfd", **kw):
        if algorithm == "ffd":
            raise ImportError("ffd is broken here")
        return real(lengths, capacity, algorithm=algorithm, **kw)

    monkeypatch.setattr(prepack.cli, "plan", ffd_breaks)
    assert main(["plan", files["LENGTHS"], "--algorithms", "bfd,ffd,sorted"]) == 1
    captured = capsys.readouterr()
    assert "| ffd | error: ffd is broken here |" in captured.out
    assert "| sorted | " in captured.out and "prepack plan: error: ffd failed" in captured.err


def test_plan_without_binpacking_named_skips_it_under_max_per_row_and_exits_0(files, capsys):
    assert main(["plan", files["LENGTHS"], "--max-per-row", "1"]) == 0
    assert "| binpacking | skipped: it does not support --max-per-row |" in capsys.readouterr().out


# --- bench -----------------------------------------------------------------------------------------

def test_a_failed_batch_size_keeps_the_batches_already_measured(tmp_path, monkeypatch, capsys):
    padded = bench.METHOD_FNS["padded"]

    def padded_fails_at_batch_2(model, call):
        if len(call.prompts) == 2:
            raise RuntimeError("out of memory (pretend)")
        return padded(model, call)

    monkeypatch.setitem(bench.METHOD_FNS, "padded", padded_fails_at_batch_2)
    out = tmp_path / "r.json"
    code = main(["bench", "--model", "llama-tiny", "--data", "synthetic:lognormal", "--batch-sizes", "1,2",
                 "--methods", "padded,prepack", "--repeat", "1", "--warmup", "0", "--json", str(out), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "| 1 | prefill | padded |" in captured.out and "| 2 | prefill |" not in captured.out
    assert "prepack bench: error: batch size 2: RuntimeError: out of memory (pretend)" in captured.err
    written = json.loads(out.read_text())
    assert [(r["batch_size"], r["method"]) for r in written["rows"]] == [(1, "padded"), (1, "prepack")]
    assert written["meta"]["complete"] is False


def test_progress_names_each_call_as_it_starts_and_counts_every_call_including_memory(capsys):
    model = bench.build_model("llama-tiny")
    events = []
    bench.run_sweep(model, [[1, 2, 3], [4, 5]], [1, 2], methods=("padded", "prepack"), repeat=2, warmup=1,
                    progress=lambda label, done: events.append((label, done)))
    starts = [label for label, done in events if not done]
    assert len(starts) == bench.count_calls([1, 2], ["prefill"], ["padded", "prepack"], 2, 1) == 16
    assert events[0::2] == [(label, False) for label in starts]  # each call is named before it runs ...
    assert events[1::2] == [(label, True) for label in starts]  # ... and counted when it ends
    assert starts[:2] == ["batch 1 prefill padded warmup", "batch 1 prefill prepack warmup"]
    assert "batch 2 prefill prepack memory" in starts


def test_bench_logs_no_transformers_deprecation_from_prepacks_own_calls(monkeypatch):
    import transformers.utils.logging  # noqa: F401  (it installs Logger.warning_once on import: replace it after)

    # warning_once caches its messages per process: record them all, uncached
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(str(msg)), raising=False)
    model = bench.build_model("llama-tiny")
    bench.run_bench(model, [[1, 2, 3], [4, 5]], metrics=("prefill", "generate"), methods=("padded", "sorted", "prepack"),
                    repeat=1, warmup=0, new_tokens=2)
    assert [m for m in said if "deprecated" in m] == []


# --- help ------------------------------------------------------------------------------------------

def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return parser, sub.choices


def test_every_flag_of_every_subcommand_has_help_text():
    parser, subs = _subparsers()
    for name, p in [("prepack", parser), *subs.items()]:
        missing = [a.option_strings or a.dest for a in p._actions if not a.help]
        assert missing == [], f"{name}: no help for {missing}"


def test_bench_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapped inside a word
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in out and "(default: llama-small)" in out and "(default: 32;" in out
    assert "(default: padded,sorted,prepack:sdpa_masked,prepack)" in out


def test_top_level_help_has_no_raw_rst_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out
