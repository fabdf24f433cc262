"""Every transformers name prepack's mixer support relies on (docs/architecture.md lists them): this fails loudly,
naming the name, when a transformers release renames or drops one."""

import importlib
import inspect

import pytest

from .hybrid_models import HYBRIDS, build_hybrid

MIXERS = {  # modeling module -> its mixer class
    "qwen3_5": "Qwen3_5GatedDeltaNet",
    "qwen3_5_moe": "Qwen3_5MoeGatedDeltaNet",
    "qwen3_next": "Qwen3NextGatedDeltaNet",
    "olmo_hybrid": "OlmoHybridGatedDeltaNet",
    "lfm2": "Lfm2ShortConv",
    "lfm2_moe": "Lfm2MoeShortConv",
    "lfm3": "Lfm3ShortConv",
    "kimi_linear": "KimiLinearDeltaAttention",
    "minimax": "MiniMaxLightningAttention",
}


def modeling(name: str):
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_class_takes_a_cache_keyword_and_passes_kwargs_on(name):
    cls_name = MIXERS[name]
    cls = getattr(modeling(name), cls_name)
    params = inspect.signature(cls.forward).parameters
    assert "cache" in params, f"{cls_name}.forward no longer takes `cache` (prepack.mixers.CACHE_NAMES)"
    assert "hidden_states" in params and "attention_mask" in params, cls_name
    assert any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{cls_name}.forward takes no **kwargs"


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_every_mixer_layer_is_found_by_its_kind(model_type):
    from prepack.mixers import mixer_modules

    model = build_hybrid(model_type)
    types = model.config.get_text_config(decoder=True).layer_types
    found = {m.layer_idx: kind for _, m, kind in mixer_modules(model)}
    want = {i for i, t in enumerate(types) if t in ("linear_attention", "conv")}
    assert set(found) == want, f"{type(model).__name__}: mixers found at {sorted(found)}, expected {sorted(want)}"
    for i, kind in found.items():
        assert types[i] in kind.layer_types


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next", "olmo_hybrid"])
def test_gated_delta_net_forwards_cu_seq_lens_q_to_the_delta_rule(name):
    cls = getattr(modeling(name), MIXERS[name])
    source = inspect.getsource(inspect.unwrap(cls.forward))
    assert 'cu_seqlens=kwargs.pop("cu_seq_lens_q"' in source, "the varlen path (kinds.GATED_DELTA_NET.varlen) relies on it"
    assert "causal_conv1d_forward(" in source and "**kwargs" in source


@pytest.mark.parametrize("name", ["qwen3_5", "lfm2", "qwen3_next"])
def test_hub_function_hooks_keep_their_names(name):
    module = modeling(name)
    for fn in ("causal_conv1d_fn", "causal_conv1d_forward", "causal_conv1d_update"):
        assert hasattr(module, fn), f"{module.__name__}.{fn}"
    if name != "lfm2":
        assert hasattr(module, "torch_chunk_gated_delta_rule")
    from transformers.integrations import hub_kernels

    assert hub_kernels._KERNELS_INTERNAL_PATH_MAPPINGS["chunk_gated_delta_rule"] == "ops.gated_delta_rule"
    assert hub_kernels._PACKAGE_SUPPORTED_DEVICES["fla"] and hub_kernels._PACKAGE_SUPPORTED_DEVICES["causal_conv1d"]


def test_cache_keeps_its_mixer_state_methods():
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionLayer, get_layer_types_and_kwargs

    for method in ("get_conv_state", "update_conv_state", "get_recurrent_state", "update_recurrent_state",
                   "is_recording_past", "get_recurrent_states_to_keep", "increase_count"):
        assert hasattr(DynamicCache, method), f"DynamicCache.{method}"
    assert hasattr(LinearAttentionLayer, "update_conv_state") and callable(get_layer_types_and_kwargs)


def test_hybrid_attention_routes_through_the_attention_interface():
    from transformers.masking_utils import create_recurrent_attention_mask  # noqa: F401 - None for a maskless call

    for name, cls_name in (("qwen3_5", "Qwen3_5Attention"), ("qwen3_next", "Qwen3NextAttention"), ("lfm2", "Lfm2Attention")):
        forward = inspect.unwrap(getattr(modeling(name), cls_name).forward)
        assert "ALL_ATTENTION_FUNCTIONS" in forward.__code__.co_names, cls_name


def test_decoder_layers_pass_keyword_arguments_on_to_their_mixer():
    for name, cls_name, call in (("qwen3_5", "Qwen3_5DecoderLayer", "self.linear_attn("), ("lfm2", "Lfm2DecoderLayer", "self.conv(")):
        source = inspect.getsource(getattr(modeling(name), cls_name).forward)
        after = source[source.index(call):]
        assert "**kwargs" in after[: after.index("\n            )")], f"{cls_name} no longer passes **kwargs to its mixer"


def test_linear_attention_cache_layers_keep_the_names_the_engine_stacks_states_through():
    """prepack.mixers.states.StepStates gathers and scatters a layer's states through these names."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    model = build_hybrid("qwen3_5_text")
    cache = DynamicCache(config=model.config)
    layer = cache.layers[0]
    assert isinstance(layer, LinearAttentionCacheLayerMixin)
    for name in ("number_of_states", "is_conv_states_initialized", "is_recurrent_states_initialized", "conv_states",
                 "recurrent_states", "conv_kernel_size"):
        assert hasattr(layer, name), f"LinearAttentionLayer.{name} is gone (prepack.mixers.states.StepStates)"
    conv, rec = torch.randn(2, 8, 4), torch.randn(2, 2, 4, 4)
    assert layer.update_conv_state(conv, state_idx=0, conv_kernel_size=4) is not None
    layer.update_recurrent_state(rec, state_idx=0)
    assert torch.equal(layer.conv_states[0], conv) and torch.equal(layer.recurrent_states[0], rec)
    assert layer.is_conv_states_initialized[0] and layer.is_recurrent_states_initialized[0] and layer.has_previous_state[0]


def test_minimax_keeps_its_own_cache_class_and_the_lightning_attention_contract():
    """MiniMax's model requires its own MiniMaxCache (linear_cache beside the layers); its lightning attention returns
    (output, state), which its decoder layer unpacks and drops (prepack returns (output, None))."""
    from transformers import DynamicCache, LlamaConfig, MiniMaxConfig

    from prepack.mixers.states import new_cache, own_cache_class

    minimax = modeling("minimax")
    assert own_cache_class(MiniMaxConfig()) is minimax.MiniMaxCache, "MiniMaxCache is no longer the one cache class of modeling_minimax"
    assert type(new_cache(MiniMaxConfig())) is minimax.MiniMaxCache
    assert type(new_cache(LlamaConfig())) is DynamicCache
    for name in ("get_linear_cache", "set_linear_cache", "linear_cache"):
        assert name in vars(minimax.MiniMaxCache) or name in inspect.getsource(minimax.MiniMaxCache.__init__), name
    assert "isinstance(cache, MiniMaxCache)" in inspect.getsource(minimax.MiniMaxModel.forward)
    source = inspect.getsource(minimax.MiniMaxDecoderLayer.forward)
    assert "hidden_states, _ = self.self_attn(" in source and "**kwargs" in source, "MiniMaxDecoderLayer's call changed"
