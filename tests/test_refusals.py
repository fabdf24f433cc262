"""Refused by default: families and layers prepack cannot pack exactly raise before computing anything.

(The exact families are the table in test_exactness.py.) Each refused family: prepack raises
``UnsupportedModelError`` naming the model and the reason; in the attention function, a keyword
or a layer attribute prepack does not implement is refused, never dropped.
"""

import pytest
import torch
from transformers import Lfm2Config, Lfm2ForCausalLM

import prepack
from prepack.hf.support import UnsupportedModelError

from .models import COMMON, prompts

def test_convolution_hybrid_is_refused_before_anything_runs():
    torch.manual_seed(0)
    model = Lfm2ForCausalLM(Lfm2Config(
        **{**COMMON, "num_hidden_layers": 2}, layer_types=["conv", "full_attention"],
    )).eval()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedModelError, match="Lfm2ForCausalLM cannot be packed exactly: .*convolution over tokens"):
        prepack.prefill(model, prompts([3, 4]))
    assert not calls


def test_a_hybrid_is_refused_from_its_structure_not_its_name():
    from tests.models import build as build_plain

    model = build_plain("llama")
    model.model.layers[0].token_mixer = torch.nn.Conv1d(64, 64, 3, groups=64)  # a new, unnamed hybrid
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM cannot be packed exactly: .*layers.0.token_mixer"):
        prepack.prefill(model, prompts([3, 4]))


def test_recurrent_cache_layer_types_are_refused():
    from tests.models import build as build_plain

    model = build_plain("llama")
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="'linear_attention' \\(linear-attention / recurrent layers\\)"):
        prepack.prefill(model, prompts([3, 4]))


# ---------------------------------------------------------------- refuse by default, in the attention function


class _Attention(torch.nn.Module):
    """An attention module as transformers passes it to the attention function."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True


def _call(module, q=None, k=None, v=None, cu=None, **kwargs):
    from prepack.hf.registration import prepack_attention

    if q is None:
        q = k = v = torch.randn(1, 2, 6, 8)
        cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return prepack_attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, **kwargs)


def test_an_attention_keyword_prepack_does_not_implement_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="_Attention \\(layer 0\\) passed attention keyword\\(s\\) position_bias"):
        _call(_Attention(LlamaConfig()), position_bias=torch.zeros(1))


def test_a_sliding_layer_whose_call_carries_no_window_uses_its_configs_window():
    from transformers import LlamaConfig

    config = LlamaConfig(sliding_window=2)
    config.layer_types = ["sliding_attention"]
    q = k = v = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = _call(_Attention(config), q, k, v, cu)
    flat = q.transpose(1, 2).reshape(6, 2, 8)
    want = prepack.get_backend("reference")(flat, flat, flat, cu, cu, 4, 4, causal=True, window_size=(1, 0))
    torch.testing.assert_close(out[0], want)
    unwindowed = prepack.get_backend("reference")(flat, flat, flat, cu, cu, 4, 4, causal=True)
    assert (out[0] - unwindowed).abs().max() > 1e-3


def test_a_sliding_layer_with_no_window_anywhere_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.layer_types, config.sliding_window = ["sliding_attention"], None
    with pytest.raises(UnsupportedModelError, match="sliding-window layer but neither its call nor its config gives a window"):
        _call(_Attention(config))


def test_a_module_with_sinks_whose_call_omits_them_is_refused():
    from transformers import LlamaConfig

    module = _Attention(LlamaConfig())
    module.sinks = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UnsupportedModelError, match="has attention sinks but its call did not pass them"):
        _call(module)


def test_a_config_that_soft_caps_but_a_call_that_does_not_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.attn_logit_softcapping = 50.0
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping=50.0"):
        _call(_Attention(config))


def test_non_causal_attention_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="asks for non-causal attention"):
        _call(_Attention(LlamaConfig()), is_causal=False)


def test_generate_refuses_pixel_values_it_would_otherwise_drop():
    from tests.models import build as build_plain, left_pad

    ids, mask = left_pad(prompts([3, 5]))
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(2, 3, 4, 4)}
    with pytest.raises(ValueError, match="carries 'pixel_values'"):
        prepack.generate(build_plain("llama"), batch, max_new_tokens=2)
