"""The varlen-kernel path of hybrid models: flash-linear-attention's ``cu_seqlens`` and causal-conv1d's ``seq_idx``.

Where those kernels run (CUDA), a packed mixer call is the module's own forward run once with the layout as
keywords, which transformers forwards to the kernels. On CPU the kernels are shimmed with their own signatures
(implemented per segment by transformers' torch code) and installed the way ``kernels.kernelize`` installs a
hub kernel (the mixer's private ``_kernel_funcs`` entry), so the whole plumbing runs here.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import prepack
from prepack import mixers
from prepack.mixers import kinds

from .conftest import gpu
from .hybrid_models import build_hybrid, random_prompts

TOL = 1e-4
pytest.importorskip("kernels")  # the per-instance kernel hooks (transformers' use_kernelized_func) need it


def fla_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, calls=None, torch_rule=None, **_):
    """flash-linear-attention's ``chunk_gated_delta_rule`` signature: (1, T, H, D) streams cut at ``cu_seqlens``."""
    calls.append(cu_seqlens)
    assert cu_seqlens is not None and q.shape[0] == 1 and initial_state is None
    cu = cu_seqlens.tolist()
    outs = [torch_rule(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b],
                       use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0] for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(outs, 1), None


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None, calls=None, **_):
    """causal-conv1d's ``causal_conv1d_fn`` signature: x (1, C, T), weight (C, W); tokens of different ``seq_idx`` never mix."""
    calls.append(seq_idx)
    assert seq_idx is not None and x.shape[0] == 1
    ids = seq_idx[0]
    starts = torch.cat([torch.tensor([0]), torch.nonzero(ids[1:] != ids[:-1]).reshape(-1) + 1, torch.tensor([x.shape[2]])]).tolist()
    outs = []
    for a, b in zip(starts[:-1], starts[1:]):
        seg = F.conv1d(x[:, :, a:b], weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])[:, :, : b - a]
        outs.append(F.silu(seg) if activation in ("silu", "swish") else seg)
    return torch.cat(outs, 2)


def with_shims(model, calls: dict):
    """Install the shims on every mixer of ``model`` as ``kernels.kernelize`` installs a hub kernel (per instance)."""
    import sys
    import types

    def method(owner, fn, **bound):  # a bound forward, as kernelize sets one
        return types.MethodType(lambda self, *args, **kwargs: fn(*args, **kwargs, **bound), owner)

    for _, module, _ in mixers.mixer_modules(model):
        torch_rule = _torch_code(getattr(sys.modules[type(module).__module__], "torch_chunk_gated_delta_rule", None))
        funcs = module._kernel_funcs
        if "chunk_gated_delta_rule" in funcs:
            rule = funcs["chunk_gated_delta_rule"]
            rule.forward = method(rule, fla_chunk_gated_delta_rule, calls=calls["fla"], torch_rule=torch_rule)
        conv = funcs["causal_conv1d_fn"]
        conv.forward = method(conv, causal_conv1d_fn, calls=calls["conv"])
    return model


def _torch_code(hooked):
    """The modeling file's own torch function under its hub hooks (calling the hooked name inside the mixer would
    reach the shim again)."""
    import inspect

    if hooked is None:
        return None
    inner = next(c.cell_contents for c in type(hooked).forward.__closure__ if inspect.isfunction(c.cell_contents))
    return inspect.unwrap(inner)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """The built-in kinds' varlen paths, declared ready on CPU with nothing to import."""
    patched = [dataclasses.replace(k, varlen=dataclasses.replace(k.varlen, packages=(), devices=("cpu",))) if k.varlen else k
               for k in kinds.KINDS]
    monkeypatch.setattr(kinds, "KINDS", patched)


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm2"])
def test_varlen_kernels_get_the_layout_and_match_each_prompt_alone(model_type, varlen_on_cpu):
    model, seqs = build_hybrid(model_type), random_prompts([6, 13, 1, 9], seed=20)
    with torch.no_grad():
        want = [model(torch.tensor([s])).logits[0, -1] for s in seqs]
    calls = {"fla": [], "conv": []}
    got = prepack.forward_at(with_shims(model, calls), seqs)
    n_mixers = len(mixers.mixer_modules(model))
    assert len(calls["conv"]) == n_mixers  # one call per layer, with seq_idx, not one per segment
    seg_lengths = torch.bincount(calls["conv"][0][0]).tolist()  # in the plan's order
    assert sorted(seg_lengths) == sorted(map(len, seqs))
    if model_type == "qwen3_5_text":
        assert len(calls["fla"]) == n_mixers and torch.diff(calls["fla"][0]).tolist() == seg_lengths
    for i in range(len(seqs)):
        assert (got[i] - want[i]).abs().max() <= TOL, f"request {i}"


def test_without_the_kernels_each_segment_runs_alone():
    calls = {"fla": [], "conv": []}
    model = build_hybrid("qwen3_5_text")
    with pytest.raises(AssertionError):  # the shims insist on a layout: the per-segment path passes none
        prepack.forward_at(with_shims(model, calls), random_prompts([4, 5]))
    assert kinds.GATED_DELTA_NET.varlen.ready(torch.device("cpu")) is False


@gpu
def test_cuda_varlen_kernels_match_each_prompt_alone():
    pytest.importorskip("fla")
    pytest.importorskip("causal_conv1d")
    model, seqs = build_hybrid("qwen3_5_text").cuda(), random_prompts([6, 13, 1, 9], seed=21)
    assert kinds.GATED_DELTA_NET.varlen.ready(torch.device("cuda"))
    got = prepack.forward_at(model, seqs)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            want = model(torch.tensor([s], device="cuda")).logits[0, -1]
        assert (got[i] - want).abs().max() <= 1e-3, f"request {i}"
