"""The CUDA kernels' plumbing, on CPU: torch_varlen, flash-attn 4's adapter, and what ``auto`` picks.

PyTorch's ``varlen_attn`` has no CPU kernel, so shims with its exact signatures (torch 2.13, and 2.10/2.11
with ``is_causal`` only) and with ``aten._flash_attention_forward``'s schema stand in for it. They enforce
what the CUDA kernel enforces (head dim a multiple of 8 and at most 256, one head dim for q/k/v, equal head
counts unless ``enable_gqa``, int32 ``cu_seqlens``), apply windows the way ``flash_api.cpp`` does, and
compute with the float64 reference. flash-attn's own ``attention_ref`` is the oracle.
"""

import importlib
import inspect
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prepack
from prepack.attention import functions as attention
from prepack.attention import cuda as kernels

from .conftest import gpu
from .flash_attn_reference import attention_ref, generate_random_padding_mask, pad, unpad
from .models import alone_last_logits, build, prompts


CALLS: list = []  # what the shims were called with, to check which path a call took


def flash_forward_shim(
    query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
    scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
    block_table=None, num_splits=None,
):
    """``aten::_flash_attention_forward``'s schema and checks, computed by the float64 reference."""
    d = query.shape[-1]
    assert d % 8 == 0 and d <= 256, "query, key, value must have a head_size that is a multiple of 8, at most 256"
    assert key.shape[-1] == d and value.shape[-1] == d, "flash-attn 2 takes one head dim for q, k and v"
    assert all(x.stride(-1) == 1 for x in (query, key, value)), "Input tensor must have contiguous last dimension"
    assert cum_seq_q.dtype == cum_seq_k.dtype == torch.int32, "cu_seqlens_q must have dtype int32"
    assert query.shape[1] % key.shape[1] == 0, "Number of heads in key/value must divide number of heads in query"
    assert isinstance(max_q, int) and isinstance(max_k, int)
    CALLS.append(("aten", key.shape[1], is_causal, (window_size_left, window_size_right), scale))
    # flash_api.cpp (mha_varlen_fwd): a causal call has a right window of 0; a side >= max_k is unbounded
    left = -1 if window_size_left is None else window_size_left
    right = 0 if is_causal else (-1 if window_size_right is None else window_size_right)
    out = attention.reference(
        query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, softmax_scale=d ** -0.5 if scale is None else scale,
        causal=False, window_size=(left, right),
    )
    return out, None, None, None, None


def varlen_attn_2_13(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
):
    """torch 2.13's ``varlen_attn``: the same head checks and the same is_causal rule, then the kernel."""
    CALLS.append(("varlen_attn", key.shape[1], window_size, scale, enable_gqa))
    if not enable_gqa and query.size(1) != key.size(1):
        raise ValueError("Expect query and key/value to have the same number of heads. Try setting enable_gqa=True")
    is_causal = window_size == (-1, 0)
    return flash_forward_shim(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, is_causal, return_debug_mask=False,
        scale=scale, window_size_left=window_size[0], window_size_right=window_size[1],
    )[0]


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's ``varlen_attn``: causal or not, the default scale, equal head counts."""
    CALLS.append(("varlen_attn", key.shape[1], is_causal, None, False))
    if query.size(1) != key.size(1):
        raise ValueError("Expect query and key/value to have the same number of heads")
    return flash_forward_shim(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, is_causal, False)[0]


SHIMS = {"2.13": varlen_attn_2_13, "2.10": varlen_attn_2_10}


def run(version, *args, **kwargs):
    CALLS.clear()
    return kernels.varlen_call(SHIMS[version], flash_forward_shim, *args, **kwargs)


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_shim_has_the_installed_varlen_attn_signature():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    if "window_size" in inspect.signature(varlen.varlen_attn).parameters:
        assert _params(varlen_attn_2_13) == _params(varlen.varlen_attn)
    else:
        assert _params(varlen_attn_2_10)[:8] == _params(varlen.varlen_attn)[:8]


def test_the_shim_has_the_installed_flash_attention_forward_schema():
    schema = torch.ops.aten._flash_attention_forward.default._schema
    assert [p[0] for p in _params(flash_forward_shim)] == [a.name for a in schema.arguments]


def padded_case(seed, seqlen_q, seqlen_k, heads, kv_heads, d, d_v, batch=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, d, generator=g)
    k = torch.randn(batch, seqlen_k, kv_heads, d, generator=g)
    v = torch.randn(batch, seqlen_k, kv_heads, d_v, generator=g)
    return q, k, v, generate_random_padding_mask(seqlen_q, batch, g), generate_random_padding_mask(seqlen_k, batch, g)


@settings(max_examples=40, deadline=None)
@given(
    version=st.sampled_from(list(SHIMS)),
    seqlens=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    dims=st.sampled_from([(16, 16), (12, 12), (16, 8), (8, 20)]),
    causal=st.booleans(),
    local=st.one_of(st.none(), st.tuples(st.integers(0, 30), st.integers(0, 30))),
    seed=st.integers(0, 2**16),
)
def test_torch_varlen_gives_flash_attn_reference_on_either_signature(version, seqlens, heads, dims, causal, local, seed):
    q, k, v, q_mask, k_mask = padded_case(seed, *seqlens, *heads, *dims)
    (q_u, cu_q, max_q), (k_u, cu_k, max_k), (v_u, _, _) = unpad(q, q_mask), unpad(k, k_mask), unpad(v, k_mask)
    # flash-attn's test domain: no window, or both sides in [0, seqlen_k) (attention_ref reads a lone -1
    # literally, and does not model the kernel's "a side >= max_seqlen_k is unbounded", tested below)
    window = (-1, -1) if local is None else tuple(w % max_k for w in local)
    out = run(version, q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window)
    want = attention_ref(q, k, v, q_mask, k_mask, causal=causal, window_size=window)
    assert out.shape == (q_u.shape[0], heads[0], dims[1])
    torch.testing.assert_close(pad(out, q_mask), want, atol=1e-5, rtol=1e-5)


def stream(lengths=(5, 9, 3), heads=4, kv_heads=2, d=16, d_v=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    t = int(cu[-1])
    q, k = torch.randn(t, heads, d, generator=g), torch.randn(t, kv_heads, d, generator=g)
    return q, k, torch.randn(t, kv_heads, d_v or d, generator=g), cu, cu, max(lengths), max(lengths)


def flash_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(-1, -1), softcap=0.0, softmax_scale=None):
    """flash-attn's ``attention_ref`` on a varlen stream: padded per segment, run, unpadded -> (T_q, H, D_v)."""
    def mask(cu, width):
        lengths = (cu[1:] - cu[:-1]).long()
        return torch.arange(width)[None, :] < lengths[:, None]

    q_mask, k_mask = mask(cu_q, max_q), mask(cu_k, max_k)
    if softmax_scale is not None:  # attention_ref scales by head_dim ** -0.5: fold the rest of the scale into q
        q = q * (softmax_scale * q.shape[-1] ** 0.5)
    out = attention_ref(pad(q, q_mask), pad(k, k_mask), pad(v, k_mask), q_mask, k_mask, causal=causal,
                        window_size=window_size, softcap=softcap)
    return out[q_mask]


def test_grouped_heads_go_to_torch_2_13_as_enable_gqa_without_copying_keys():
    run("2.13", *stream(heads=8, kv_heads=2))
    assert CALLS[0] == ("varlen_attn", 2, (-1, 0), 16 ** -0.5, True)


def test_grouped_heads_are_expanded_for_torch_2_10_which_has_no_enable_gqa():
    args = stream(heads=8, kv_heads=2)
    out = run("2.10", *args)
    assert CALLS[0] == ("varlen_attn", 8, True, None, False)
    torch.testing.assert_close(out, flash_reference(*args), atol=1e-5, rtol=1e-5)


def test_causal_means_window_minus_one_zero_which_varlen_attn_reads_as_is_causal():
    run("2.13", *stream(), causal=True)
    assert CALLS[0][2] == (-1, 0)
    run("2.13", *stream(), causal=False, window_size=(-1, -1))
    assert CALLS[0][2] == (-1, -1)


def test_a_window_reaching_max_seqlen_k_is_sent_as_unbounded_like_flash_attn():
    run("2.13", *stream(lengths=(5, 9, 3)), causal=True, window_size=(9, 0))
    assert CALLS[0][2] == (-1, 0)


@pytest.mark.parametrize("call", [
    dict(window_size=(3, 0)),
    dict(softmax_scale=0.3),
    dict(d=12),  # padded to 16: the default scale would be 16 ** -0.5, so the scale goes explicitly
])
def test_torch_2_10_sends_windows_and_explicit_scales_to_the_aten_kernel(call):
    d = call.pop("d", 16)
    args = stream(d=d)
    out = run("2.10", *args, **call)
    assert [c[0] for c in CALLS] == ["aten"] and CALLS[0][1] == 2  # grouped heads, not expanded
    torch.testing.assert_close(out, flash_reference(*args, **call), atol=1e-5, rtol=1e-5)


def test_a_value_head_dim_of_its_own_is_padded_and_cut_back_exactly():
    args = stream(d=24, d_v=8)
    out = run("2.13", *args, softmax_scale=None)
    assert out.shape == (17, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, flash_reference(*args), atol=1e-5, rtol=1e-5)


def test_an_empty_stream_gives_an_empty_output_without_calling_the_kernel():
    q, k, v = torch.zeros(0, 4, 16), torch.zeros(0, 2, 16), torch.zeros(0, 2, 8)
    cu = torch.zeros(1, dtype=torch.int32)
    assert run("2.13", q, k, v, cu, cu, 0, 0).shape == (0, 4, 8) and CALLS == []


def test_softcap_is_refused_naming_the_backends_that_have_it():
    with pytest.raises(ValueError, match=r"no attention logit soft-capping \(softcap=30.0\).*'flash'.*'sdpa_varlen'"):
        run("2.13", *stream(), softcap=30.0)


def test_dropout_is_refused():
    with pytest.raises(ValueError, match="no attention dropout"):
        run("2.13", *stream(), dropout_p=0.1)


def test_a_head_dim_above_256_is_refused_naming_the_limit():
    with pytest.raises(ValueError, match="head dim 264 is above the 256 .* use backend='sdpa_varlen'"):
        run("2.13", *stream(d=264))


def test_torch_varlen_on_cpu_tensors_names_the_fix():
    with pytest.raises(RuntimeError, match="(CUDA-only.*use backend='sdpa_varlen'|needs torch >= 2.10)"):
        prepack.get_backend("torch_varlen")(*stream())


def test_torch_varlen_in_float32_on_cuda_names_the_fix():
    with pytest.raises(RuntimeError, match="float16 or bfloat16.*dtype=torch.bfloat16.*'sdpa_varlen' for torch.float32"):
        prepack.resolve_backend("torch_varlen", device="cuda", dtype=torch.float32)


def test_a_torch_older_than_2_10_is_named_in_the_error():
    problem = kernels.torch_varlen_import_problem(version=(2, 9))
    assert "needs torch >= 2.10" in problem and "this is torch 2.9" in problem


def test_prefill_with_torch_varlen_on_cpu_refuses_before_running_the_model():
    model = build("llama")
    with pytest.raises(RuntimeError, match="CUDA-only"):
        prepack.prefill(model, prompts([3, 4]), backend="torch_varlen")


def test_torch_varlen_is_refused_for_a_soft_capping_model():
    # Gemma 2 soft-caps attention logits: a clear refusal up front, not a wrong answer or a kernel crash
    with pytest.raises(RuntimeError, match="soft-capping"):
        prepack.resolve_backend("torch_varlen", device="cuda", dtype=torch.bfloat16, softcap=30.0)


# --- flash-attn 4's adapter ---------------------------------------------------------------------

def fa4_shim(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqused_q=None,
             seqused_k=None, page_table=None, softmax_scale=None, causal=False, window_size=(None, None),
             learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None):
    """flash-attn 4's varlen entry point (None: unbounded window side), computed by the reference."""
    window = tuple(-1 if w is None else w for w in window_size)
    out = attention.reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap)
    return out, None


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (3, 0)), (False, (2, 1))])
def test_flash_attn_4_adapter_gives_flash_attn_2_semantics(causal, window):
    args = stream(heads=4, kv_heads=2)
    out = kernels.flash_attn_4(fa4_shim, *args, causal=causal, window_size=window, softcap=5.0)
    want = flash_reference(*args, causal=causal, window_size=window, softcap=5.0)
    assert out.shape == want.shape == (17, 4, 16)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# --- what auto picks on a CUDA machine ----------------------------------------------------------

@pytest.fixture
def cuda_machine(monkeypatch):
    """A CUDA machine with an sm90 GPU, as far as prepack's checks can tell (no kernel runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.fixture
def flash_attn_package(tmp_path, monkeypatch):
    """Install a fake flash_attn package (``files``: path -> source) for the duration of a test."""

    def forget():
        for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            del sys.modules[name]
        kernels.find_flash_attn.cache_clear()
        importlib.invalidate_caches()

    def install(files: dict):
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path))
        forget()

    saved = {m: sys.modules[m] for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")}
    yield install
    forget()
    sys.modules.update(saved)


def no_flash_attn(flash_attn_package):
    flash_attn_package({})  # nothing installed in tmp_path; the real one (if any) is forgotten below
    sys.modules["flash_attn"] = None  # an import of flash_attn now raises ModuleNotFoundError(name='flash_attn')


def test_auto_on_cuda_in_bf16_is_torch_varlen_when_flash_attn_is_not_installed(cuda_machine, flash_attn_package):
    no_flash_attn(flash_attn_package)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "not installed" is silent
        assert prepack.resolve_backend("auto", device="cuda", dtype=torch.bfloat16) == "torch_varlen"


@pytest.mark.parametrize("needs", [dict(dtype=torch.float32), dict(softcap=30.0), dict(head_dim=512)])
def test_auto_on_cuda_falls_back_to_sdpa_varlen_where_torch_varlen_cannot_be_exact(cuda_machine, flash_attn_package, needs):
    no_flash_attn(flash_attn_package)
    kwargs = {"dtype": torch.bfloat16, **needs}
    assert prepack.resolve_backend("auto", device="cuda", **kwargs) == "sdpa_varlen"


def test_auto_on_a_pre_ampere_gpu_is_sdpa_varlen(cuda_machine, flash_attn_package, monkeypatch):
    no_flash_attn(flash_attn_package)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert prepack.resolve_backend("auto", device="cuda", dtype=torch.float16) == "sdpa_varlen"


def test_auto_on_cuda_prefers_flash_attn_when_it_imports(cuda_machine, flash_attn_package):
    flash_attn_package({"flash_attn/__init__.py": "def flash_attn_varlen_func(*args, **kwargs):\n    return 'fa2'\n"})
    assert prepack.resolve_backend("auto", device="cuda", dtype=torch.bfloat16) == "flash"
    assert prepack.get_backend("flash")() == "fa2"


def test_a_flash_attn_that_fails_to_import_is_reported_not_skipped(cuda_machine, flash_attn_package):
    flash_attn_package({"flash_attn/__init__.py": "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n"})
    with pytest.warns(RuntimeWarning, match="flash-attn is installed but does not import .*undefined symbol"):
        assert prepack.resolve_backend("auto", device="cuda", dtype=torch.bfloat16) == "torch_varlen"
    with pytest.raises(RuntimeError, match="backend='flash': flash-attn is installed but does not import .*undefined symbol"):
        prepack.get_backend("flash")


def test_flash_attn_4_without_its_cute_dsl_names_the_pip_target_pitfall(cuda_machine, flash_attn_package):
    flash_attn_package({"flash_attn/cute/__init__.py": "import cutlass.cute\n"})
    with pytest.raises(RuntimeError, match="No module named 'cutlass'.*not with --target"):
        prepack.get_backend("flash")


def test_flash_attn_4_alone_is_used_through_its_adapter(cuda_machine, flash_attn_package):
    flash_attn_package({"flash_attn/cute/__init__.py": "def flash_attn_varlen_func(q, *a, **kw):\n    return q + 1, None\n"})
    assert kernels.find_flash_attn().version == "4"
    q, k, v, cu, _, m, _ = stream()
    torch.testing.assert_close(prepack.get_backend("flash")(q, k, v, cu, cu, m, m), q + 1)


# --- on a GPU -----------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [(-1, -1), (5, 0)])
@pytest.mark.parametrize("dims", [(64, 64), (72, 72), (96, 64)])
def test_torch_varlen_matches_reference_on_gpu(dtype, window, dims):
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 64, 5, 130]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    t = int(cu[-1])
    q = torch.randn(t, 8, dims[0], generator=g).to("cuda", dtype)
    k = torch.randn(t, 2, dims[0], generator=g).to("cuda", dtype)
    v = torch.randn(t, 2, dims[1], generator=g).to("cuda", dtype)
    got = prepack.get_backend("torch_varlen", device="cuda", dtype=dtype)(q, k, v, cu, cu, 130, 130, window_size=window)
    want = attention.reference(q, k, v, cu, cu, 130, 130, window_size=window)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@gpu
def test_prefill_in_bf16_on_gpu_runs_a_flash_kernel_and_matches_each_prompt_alone():
    model, seqs = build("llama").to("cuda", torch.bfloat16), [p.cuda() for p in prompts([1, 5, 17, 3, 30, 12])]
    result = prepack.prefill(model, seqs)
    assert result.backend in ("flash", "torch_varlen")
    alone = alone_last_logits(model, seqs)
    torch.testing.assert_close(result.logits.float(), alone.float(), atol=3e-2, rtol=3e-2)
