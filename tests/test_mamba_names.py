"""The transformers names prepack's state-space support relies on (docs/architecture.md lists them).

Each test fails, naming the model type and the name, when a transformers release renames or reshapes one.
"""

import importlib
import inspect

import pytest
import torch

from prepack.mixers import mamba as mamba_hooks

MAMBA2_TYPES = ("mamba2", "bamba", "nemotron_h", "falcon_h1", "granitemoehybrid", "zamba2")
# the hooks' parameters, in order, as transformers' modeling files define them
HOOK_PARAMETERS = {
    mamba_hooks.CONV_HOOK: ["conv1d", "hidden_states", "cache", "layer_idx", "activation", "state_idx", "kwargs"],
    mamba_hooks.SCAN_HOOK: ["module", "hidden_states", "B", "C", "dt", "cache", "kwargs"],
}


def _modeling(model_type):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


@pytest.mark.parametrize("model_type", MAMBA2_TYPES)
def test_each_mamba2_modeling_file_exposes_the_conv_and_scan_hooks_with_their_signatures(model_type):
    module = _modeling(model_type)
    for name, params in HOOK_PARAMETERS.items():
        hook = getattr(module, name, None)
        assert hook is not None, f"transformers.models.{model_type}.modeling_{model_type}.{name} is gone"
        # with `kernels` installed the hook is an nn.Module instance (use_kernel_forward_from_hub on a function)
        assert getattr(hook, "kernel_layer_name", None) == name, f"{model_type}.{name} is no longer a kernels hook named {name!r}"
        got = [p for p in inspect.signature(type(hook).forward).parameters if p != "self"]
        assert got == params, f"{model_type}.{name} takes {got}, prepack's hook takes {params}"


@pytest.mark.parametrize("model_type", MAMBA2_TYPES)
def test_each_mamba2_mixer_holds_per_instance_hooks_and_the_attributes_the_scan_reads(model_type):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import model_zoo

    model = model_zoo.build(model_type, {})
    found = [m for m in model.modules() if "_kernel_funcs" in m.__dict__ and mamba_hooks.SCAN_HOOK in m._kernel_funcs]
    assert found, f"{model_type}: no module holds a per-instance {mamba_hooks.SCAN_HOOK} (kernels' use_kernelized_func)"
    for mixer in found:
        missing = [a for a in mamba_hooks.MIXER_ATTRIBUTES if not hasattr(mixer, a)]
        assert not missing, f"{model_type}: {type(mixer).__name__} lacks {missing}, which mamba2_scan_forward reads"
        assert isinstance(mixer._kernel_funcs[mamba_hooks.CONV_HOOK], torch.nn.Module)


def test_the_torch_oracles_and_cache_layer_the_tests_use_keep_their_names():
    from transformers.cache_utils import Cache, LinearAttentionLayer  # noqa: F401

    mamba2, mamba = _modeling("mamba2"), _modeling("mamba")
    for module, name in ((mamba2, "mamba2_chunk_scan"), (mamba2, "causal_conv1d_fn"), (mamba, "mamba_selective_scan"),
                         (mamba, "mamba_selective_state_update")):
        assert callable(getattr(module, name, None)), f"{module.__name__}.{name} is gone"
    # the conv state a prefill leaves is the last conv_kernel_size inputs (zero-padded), not K - 1
    layer = LinearAttentionLayer()
    layer.update_conv_state(torch.arange(3.0).view(1, 1, 3), conv_kernel_size=4)
    assert layer.conv_states[0].tolist() == [[[0.0, 0.0, 1.0, 2.0]]]


@pytest.mark.parametrize(("model_type", "cls_name"), [("mamba", "MambaMixer"), ("falcon_mamba", "FalconMambaMixer")])
def test_mamba1_mixers_keep_the_attributes_and_cache_keyword_prepack_reads(model_type, cls_name):
    from prepack.mixers import kind_of

    cls = getattr(_modeling(model_type), cls_name)
    params = list(inspect.signature(inspect.unwrap(cls.forward)).parameters)
    assert params[:4] == ["self", "hidden_states", "cache", "attention_mask"], f"{cls_name}.forward takes {params}"
    from .ssm_models import build_ssm

    mixer = next(m for m in build_ssm(model_type).modules() if type(m) is cls)
    assert kind_of(mixer) is mamba_hooks.MAMBA1, f"{cls_name} is no longer recognised as a Mamba1 mixer"
