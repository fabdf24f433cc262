"""lm-eval model "prepack": same per-request results and metrics as lm-eval's own "hf" model, offline.

A tiny random-weight Llama and a BPE tokenizer trained here are saved to a
local directory; three local tasks over small JSONL sets exercise the three
request types (multiple choice -> loglikelihood, a perplexity task ->
loglikelihood_rolling, a generation task -> generate_until).
"""

import json
import sys

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import prepack.lm_eval  # noqa: E402,F401  registers "prepack"

WORDS = "the a cat dog sat ran on under mat log red blue big small fast slow and then it was".split()
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(model dir, task dir): a saved random Llama with a tokenizer trained offline, and three task YAMLs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lm_eval")
    rng = np.random.default_rng(0)
    corpus = [sentence(rng, int(rng.integers(3, 30))) for _ in range(300)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)

    tasks = root / "tasks"
    tasks.mkdir()
    mc = [{"question": sentence(rng, int(rng.integers(4, 20))), "choices": [sentence(rng, int(rng.integers(1, 5))) for _ in range(4)],
           "answer": int(rng.integers(4))} for _ in range(12)]
    # documents longer than the 64-token window, so that rolling windows really roll
    ppl = [{"text": sentence(rng, int(rng.integers(5, 90)))} for _ in range(6)]
    gen = [{"question": sentence(rng, int(rng.integers(3, 12))), "answer": "cat"} for _ in range(6)]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ntest_split: train\n"
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files: {tasks / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tasks / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files: {tasks / 'ppl.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files: {tasks / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return model_dir, tasks


def evaluate(model: str, local, tasks=TASKS, **model_args):
    model_dir, task_dir = local
    return lm_eval.simple_evaluate(
        model=model, model_args={"pretrained": str(model_dir), "device": "cpu", "dtype": "float32", **model_args},
        tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)), log_samples=True, batch_size=4,
    )


@pytest.fixture(scope="module")
def hf_results(local):
    return evaluate("hf", local)


def responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def metrics(results):
    return {t: {k: v for k, v in m.items() if k != "alias"} for t, m in results["results"].items()}


def assert_same_results(mine, theirs):
    for task in ("tiny_mc", "tiny_ppl"):  # [[(logprob, is_greedy)] or [logprob], ...] per document
        a, b = responses(mine, task), responses(theirs, task)
        flat = lambda r: [x[0][0] if isinstance(x[0], (list, tuple)) else x[0] for doc in r for x in doc]  # noqa: E731
        assert len(flat(a)) == len(flat(b)) > 0
        assert np.abs(np.array(flat(a), float) - np.array(flat(b), float)).max() <= 1e-4
    assert responses(mine, "tiny_gen") == responses(theirs, "tiny_gen")
    for task, values in metrics(theirs).items():
        for name, value in values.items():
            if isinstance(value, str):  # e.g. a stderr lm-eval reports as "N/A"
                assert metrics(mine)[task][name] == value, (task, name)
            else:  # log-likelihoods agree to fp32 rounding
                assert metrics(mine)[task][name] == pytest.approx(value, rel=1e-6, abs=1e-6), (task, name)


def test_prepack_gives_the_hf_models_log_likelihoods_generations_and_metrics(local, hf_results):
    assert_same_results(evaluate("prepack", local, token_budget=96), hf_results)


def test_rolling_tasks_on_the_row_backend_give_the_hf_models_log_likelihoods(local, hf_results):
    mine = responses(evaluate("prepack", local, tasks=["tiny_ppl"], attn_backend="sdpa_masked"), "tiny_ppl")
    theirs = responses(hf_results, "tiny_ppl")
    assert len(mine) == len(theirs) == 6
    assert np.abs(np.array(mine, float) - np.array(theirs, float)).max() <= 1e-4


def test_lm_eval_command_line_runs_model_prepack(local, hf_results, tmp_path, monkeypatch):
    """``python -m prepack.lm_eval run ...`` is lm-eval's own command line with "prepack" registered (run in-process)."""
    model_dir, tasks = local
    argv = [
        "prepack.lm_eval", "run", "--model", "prepack", "--model_args", f"pretrained={model_dir},dtype=float32",
        "--device", "cpu", "--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(tmp_path),
        "--log_samples",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    prepack.lm_eval.main()
    # per request: the same log-likelihood and greedy flag as lm-eval's hf model
    (samples,) = tmp_path.rglob("samples_tiny_mc*.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    mine = [(float(lp), str(greedy)) for s in logged for (lp, greedy), in s["resps"]]
    theirs = [(float(lp), str(greedy)) for doc in responses(hf_results, "tiny_mc") for (lp, greedy), in doc]
    assert len(mine) == len(theirs) == 48  # 12 questions x 4 choices
    assert np.abs(np.array([m[0] for m in mine]) - np.array([t[0] for t in theirs])).max() <= 1e-4
    assert [m[1] for m in mine] == [t[1] for t in theirs]
    (out,) = tmp_path.rglob("results*.json")
    got = json.loads(out.read_text())["results"]["tiny_mc"]
    want = hf_results["results"]["tiny_mc"]
    assert got["acc,none"] == pytest.approx(want["acc,none"]) and got["acc_norm,none"] == pytest.approx(want["acc_norm,none"])


def test_the_prepack_model_is_in_lm_evals_registry():
    from lm_eval.api.registry import get_model

    assert get_model("prepack") is prepack.lm_eval.PrepackLM
