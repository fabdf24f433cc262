"""One kernel registry: every backend is a Kernel that declares what it supports, chosen once per call.

The kernel is chosen by the entry point and passed down as the object; a kernel cannot do something
because its declaration says so, and every refusal of that thing reads the same declaration.
"""

import pytest
import torch

import prepack
from prepack.attention import registry as backends
from prepack.attention import cascade
from prepack.jobs import run as jobs
from prepack.attention import cuda as kernels
from prepack.attention.registry import KERNELS, Kernel, KernelRefused, Needs, choose
from prepack.jobs.generation import generate_with_backends

from .models import build, prompts


def test_every_backend_name_is_one_kernel_of_one_registry():
    assert tuple(KERNELS) == prepack.BACKENDS
    assert all(isinstance(k, Kernel) and k.name == name for name, k in KERNELS.items())
    assert backends.SINK_BACKENDS == tuple(n for n, k in KERNELS.items() if k.sinks)


@pytest.mark.parametrize("old", ["KERNELS", "kernel_problem", "auto_kernel", "get_kernel"])
def test_the_names_the_registry_replaced_warn_and_still_work(old):
    with pytest.warns(DeprecationWarning, match=f"prepack.kernels.{old} is deprecated"):
        getattr(kernels, old)
    with pytest.warns(DeprecationWarning, match="backends.training_kernel is deprecated"):
        assert backends.training_kernel(torch.device("cpu"), torch.float32, 16, 0.0, False).name == "sdpa_varlen"


def test_torch_varlens_soft_cap_refusal_is_its_declaration_wherever_it_is_met():
    declared = KERNELS["torch_varlen"].refusal(Needs(softcap=30.0))
    assert "soft-capping (softcap=30.0)" in declared
    with pytest.raises(KernelRefused) as chosen:
        choose("torch_varlen", device="cuda", dtype=torch.bfloat16, needs=Needs(softcap=30.0))
    q, k, v, cu, _, m, _ = (torch.zeros(4, 2, 16),) * 3 + (torch.tensor([0, 4], dtype=torch.int32),) * 2 + (4, 4)
    with pytest.raises(ValueError) as called:
        kernels.varlen_call(None, None, q, k, v, cu, cu, m, m, softcap=30.0)
    assert str(chosen.value) == str(called.value) == declared


def test_a_refused_kernel_is_both_a_value_error_and_a_runtime_error():
    with pytest.raises(ValueError):
        choose("sdpa_masked", needs=Needs(continues_keys=True))
    with pytest.raises(RuntimeError):
        choose("flash", device="cpu")


def test_a_kernel_passed_down_is_checked_against_the_calls_needs():
    assert choose(KERNELS["sdpa_varlen"], needs=Needs(continues_keys=True)) is KERNELS["sdpa_varlen"]
    with pytest.raises(KernelRefused, match="cannot continue earlier keys"):
        choose(KERNELS["sdpa_masked"], needs=Needs(continues_keys=True))


def test_cascade_merging_declares_plain_causal_softmax_so_the_registry_refuses_the_rest():
    merged = cascade.cascade_kernel(KERNELS["sdpa_varlen"], parts=None, layout=None)
    assert merged.name == "sdpa_varlen" and merged.refusal(Needs()) is None
    for needs in (Needs(softcap=30.0), Needs(sinks=True), Needs(window=True)):
        assert "pass share_prefixes=False" in merged.refusal(needs)


def count_decisions(monkeypatch, *modules) -> list:
    """Patch ``choose`` in ``modules``; record each call that decides by name (not a Kernel passed down)."""
    decided = []

    def counted(name, **kwargs):
        if not isinstance(name, Kernel):
            decided.append(name)
        return choose(name, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "choose", counted)
    return decided


def test_a_prefill_with_a_shared_prefix_in_chunks_chooses_its_kernel_once(monkeypatch):
    model = build("llama")
    header = prompts([40])[0]  # longer than the shortest prefix worth sharing (prefix_regions.MIN_SHARED_TOKENS)
    seqs = [torch.cat([header, p]) for p in prompts([5, 9, 7], seed=1)]
    decided = count_decisions(monkeypatch, jobs)
    result = prepack.prefill(model, seqs, token_budget=16)
    assert result.shared_tokens > 0
    assert decided == ["auto"]


def test_generate_reports_the_kernel_it_chose_without_choosing_again(monkeypatch):
    from prepack.jobs import engine
    from prepack.jobs import generation

    model = build("llama")
    decided = count_decisions(monkeypatch, engine, jobs)
    assert not hasattr(generation, "choose")
    ran = generate_with_backends(model, prompts([4, 6]), backend="reference", max_new_tokens=2, do_sample=False)
    assert decided == ["reference"] and ran.backends == ("reference",)


def test_score_with_shared_contexts_chooses_its_kernel_once(monkeypatch):
    from prepack.jobs import scoring

    model = build("llama")
    context, other = prompts([9])[0].tolist(), prompts([6], seed=2)[0].tolist()
    requests = [(context, [3, 4]), (context, [5]), (other, [7, 8, 9])]
    decided = count_decisions(monkeypatch, scoring, jobs)
    assert len(prepack.score(model, requests)) == 3
    assert decided == ["auto"]
