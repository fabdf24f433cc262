"""Models inside wrappers: PEFT adapters, ``torch.compile``, hooks, replaced ``forward`` methods.

A user hands prepack what they run: a ``PeftModel`` around a causal LM (LoRA, IA3, LoHa, ...
injected into its layers), a ``torch.compile``'d ``OptimizedModule``, a model with forward
hooks, or one whose ``forward`` was replaced by a wrapper without a signature. Two questions
have different answers for these:

* *What is the model?* (its config, its class's ``forward`` signature, its head, whether it can
  generate): asked of :func:`unwrap`, the transformers ``PreTrainedModel`` underneath, and of
  its *class*, never of a replaced ``forward`` (a ``lambda *a, **k`` has no signature to read).
* *What runs?* :func:`runner`: the outermost module that still computes the user's model,
  so adapters and hooks apply. ``torch.compile``'s wrapper is the one layer taken off: its
  ``_orig_mod`` computes the same function, and a packed call's per-call layout objects would
  only make the compiled graph recompile or break.
"""

from __future__ import annotations

import warnings

import torch

from .support import UnsupportedModelError


def _inner(module):
    """The module one wrapper layer down, or None when ``module`` is not a known wrapper."""
    orig = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    if orig is not None:
        return orig
    get_base = getattr(type(module), "get_base_model", None)  # peft's PeftModel
    if callable(get_base):
        base = module.get_base_model()
        return None if base is module else base
    return None


def unwrap(model):
    """The transformers model under any wrappers (compile, PEFT): ask it about config and signatures."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = _inner(model)
        if inner is None:
            break
        model = inner
    return model


def runner(model):
    """The module to call for a packed forward: ``model`` without ``torch.compile``'s wrapper; PEFT adapters
    and hooks stay in the call. Refuses PEFT prompt learning (virtual tokens prepended to every prompt)."""
    while getattr(model, "_orig_mod", None) is not None:
        model = model._orig_mod
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(configs, dict) and isinstance(active, str) and getattr(configs.get(active), "is_prompt_learning", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} has a prompt-learning adapter ({type(configs[active]).__name__}): it puts virtual "
            "tokens or keys before every prompt, which prepack's packed layout does not place; merge or drop the adapter"
        )
    return model


def check_can_generate(model) -> None:
    """Refuse, with the reason, a model that ``model.generate`` cannot decode from (a classifier, a bare decoder)."""
    inner = unwrap(model)
    can = getattr(inner, "can_generate", None)
    if not callable(can) or not can():
        raise TypeError(
            f"{type(inner).__name__} is not a causal language model, so prepack.generate cannot decode from it; "
            "use a *ForCausalLM model (prepack.classify takes sequence classifiers, prepack.embed any decoder)"
        )


def check_mode(model) -> None:
    """A model in train mode: refused where dropout is active (each run would differ, alone or packed), warned otherwise."""
    if not getattr(model, "training", False):
        return
    active = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training]
    config = getattr(unwrap(model), "config", None)
    p = float(getattr(config, "attention_dropout", 0.0) or 0.0) if config is not None else 0.0
    if active or p > 0:
        what = f"dropout in {active[0]}" if active else f"attention_dropout={p}"
        raise UnsupportedModelError(
            f"{type(model).__name__} is in train mode with {what}: its outputs are random, so no packed result can "
            "equal running each request alone; call model.eval() first"
        )
    warnings.warn(
        f"{type(model).__name__} is in train mode; it has no active dropout, so prepack's results are exact, "
        "but call model.eval() for inference", stacklevel=3,
    )
