"""What every packed model call shares: output kinds, the default token budget, the LM head and the decoder stack.

The executor (:mod:`prepack.executor`) runs each step's forward; these are the facts about the model it
asks: how many tokens a forward may hold (:func:`default_token_budget`), whether logits can be computed
at chosen positions only (:func:`check_lm_head`), and which module returns hidden states (:func:`base_model`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Literal

import torch

from ..attention.registry import KERNELS
from .registration import model_device
from .wrapped import unwrap

# Backends that lay requests out as rows of ``capacity`` tokens, each row under a dense (C, C)
# block-diagonal mask (the prepacking paper's layout): the kernels that declare ``rows``. Every
# other backend gets one varlen stream of at most ``token_budget`` tokens per forward.
ROW_BACKENDS = tuple(name for name, kernel in KERNELS.items() if kernel.rows)

Output = Literal["logits", "hidden_states"]
OUTPUTS: tuple[str, ...] = ("logits", "hidden_states")
Reduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_token_budget(model) -> int:
    """Tokens per forward when the caller sets no ``token_budget``.

    * CPU: 8192. Longer streams are not faster, and their memory grows with the stream
      (``benchmarks/bench_token_budget.py``, recorded in ``docs/prefill.md``).
    * CUDA: what a quarter of the free device memory holds, counting per token the keys and values
      kept for every layer plus eight hidden-size-or-MLP-width activations of the layer being run,
      clamped to [4096, 131072].
    """
    device = model_device(model)
    if device.type != "cuda":
        return 8192
    config = model.config.get_text_config(decoder=True)
    hidden = getattr(config, "hidden_size", 4096)
    width = max(hidden, getattr(config, "intermediate_size", hidden) or hidden)
    heads = getattr(config, "num_attention_heads", 32)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    layers = getattr(config, "num_hidden_layers", 32)
    per_token = (2 * layers * kv_dim + 8 * width) * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(max(free // 4 // per_token, 4096), 131072))


def no_values(model, output: str, reduce, device) -> torch.Tensor:
    """(0, X) outputs of the width and dtype a forward gives: X is V (the LM head's), D, or what ``reduce`` makes of them."""
    dtype = next(model.parameters()).dtype
    hidden = torch.zeros(0, model.config.get_text_config(decoder=True).hidden_size, dtype=dtype, device=device)
    values = model.get_output_embeddings()(hidden) if output == "logits" else hidden
    return values if reduce is None else reduce(values, torch.zeros(0, dtype=torch.long, device=device))


def check_lm_head(model) -> None:
    """Refuse logits from a model whose forward cannot compute them at chosen positions only."""
    # the class's signature, of the model under any wrapper (a PeftModel's forward takes **kwargs; a replaced
    # forward may be a lambda): it is the class's forward that the call reaches
    if "logits_to_keep" not in _forward_params(type(unwrap(model))):
        raise TypeError(
            f"{type(unwrap(model)).__name__} has no language-model head that takes logits_to_keep, so prepack cannot "
            "return its logits; ask for output='hidden_states', or use prepack.classify for a sequence-classification model"
        )


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def base_model(model):
    """The decoder stack under a task head (``model.model`` for ``LlamaForCausalLM``); its output is the last hidden state.

    Under a wrapper (PEFT, ``torch.compile``) it is the wrapped model's: adapters injected into its layers apply.
    """
    model = unwrap(model)
    base = getattr(model, "base_model", model)
    return model if base is None else base
