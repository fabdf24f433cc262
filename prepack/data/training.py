"""Refuse a model that would mix the sequences of padding-free packed rows while training.

:class:`prepack.DataCollatorForPackedRows` lays B packed rows out as one (1, T) sequence and says
where each sequence starts twice: in ``cu_seq_lens_q/k`` (read by prepack's attention and
flash-attention) and in the restarts of ``position_ids`` (read by transformers' mask builder for
``sdpa`` / ``eager`` when the forward has no cache). A model that reads neither, such as OPT,
BioGPT and XGLM on ``sdpa`` / ``eager`` (their causal mask ignores ``position_ids``) or a
state-space layer that sees no boundaries, lets the packed sequences attend to each other, and
trains on a wrong loss with no error. The collator holds no model, so it cannot tell; this module
can, given the model:

* :func:`check_packed_training` raises for a model type and attention implementation that
  ``benchmarks/sweep_packed_training.py`` did not find to keep packed sequences apart, naming both
  and the fix;
* :class:`PackedTrainingCallback` runs the check when a ``Trainer`` (or TRL's ``SFTTrainer``)
  starts training.

The table it reads, :data:`prepack.data.packed_training_models.APART`, is written by that sweep
(``docs/packed_training_models.md`` lists every type).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..collate_vision import MROPE_MODELS, PLAIN_POSITION_MODELS
from ..hf.registration import ATTN_IMPLEMENTATION, wrapped_implementation
from .packed_training_models import APART, MIXES

# Implementations that read the collator's cu_seq_lens_q/k: flash-attention reads the same keyword
# arguments as prepack's attention, so a model that keeps sequences apart on one keeps them apart on
# the other (the sweep runs on CPU, where only prepack's runs).
VARLEN_IMPLEMENTATIONS: tuple[str, ...] = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def packed_training_path(model: Any) -> str:
    """How padding-free packed rows keep their sequences apart in ``model``: the implementation family checked.

    Returns ``"prepack"`` for prepack's implementations and flash-attention (varlen keyword
    arguments), else the dense implementation's name (``"sdpa"``, ``"eager"``, ...), which keeps
    sequences apart only through a mask built from the ``position_ids`` restarts.
    """
    config = _config(model)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == ATTN_IMPLEMENTATION or wrapped_implementation(impl) is not None or impl in VARLEN_IMPLEMENTATIONS:
        return "prepack"
    return impl


def check_packed_training(model: Any) -> None:
    """Raise unless ``model`` keeps the sequences of a padding-free packed batch apart.

    Call it once before training on batches of :class:`prepack.DataCollatorForPackedRows`
    (:class:`PackedTrainingCallback` calls it for a ``Trainer``). Only reads the model.

    Args:
        model: a transformers causal LM (or a wrapper with ``.module``, DDP's).

    Raises:
        ValueError: naming the model type and attention implementation, when the sweep found them
            to mix packed sequences, or never ran them; and how to train exactly instead.
    """
    config = _config(model)
    kind = getattr(config, "model_type", None)
    impl = getattr(config, "_attn_implementation", None)
    path = packed_training_path(model)
    apart = APART.get(kind, frozenset())
    if kind in MROPE_MODELS + PLAIN_POSITION_MODELS:
        # the vision-language models DataCollatorForPackedVisionRows was checked on (tests/test_collate_vision.py),
        # 3-D mRoPE positions included: exact on prepack's attention; their own sdpa mixes the examples
        apart = frozenset({"prepack"})
    if path in apart:
        return
    name = type(getattr(model, "module", model)).__name__
    fixes = [f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"] if "prepack" in apart else []
    fixes += [f"attn_implementation={i!r}" for i in ("sdpa", "eager") if i in apart and i != path]
    fix = f"train it with {' or '.join(fixes)}" if fixes else "train it on unpacked, padded batches"
    if path in MIXES.get(kind, ()):
        why = (
            f"lets the sequences of a padding-free packed batch attend to each other (it reads neither cu_seq_lens_q/k "
            f"nor the position_ids restarts), so the loss would be silently wrong"
        )
    else:
        why = "is not known to keep the sequences of a padding-free packed batch apart (benchmarks/sweep_packed_training.py did not find it to)"
    raise ValueError(f"{name} (model_type {kind!r}) on attn_implementation {impl!r} {why}; {fix}")


class PackedTrainingCallback(TrainerCallback):
    """A ``Trainer`` callback that runs :func:`check_packed_training` on the model when training begins.

    ``Trainer(..., data_collator=DataCollatorForPackedRows(), callbacks=[PackedTrainingCallback()])``:
    a model that would mix packed sequences stops the run before its first step, with the reason.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("PackedTrainingCallback got no model from the Trainer, so it cannot check it")
        check_packed_training(model)


def _config(model: Any):
    model = getattr(model, "module", model)  # DistributedDataParallel
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config; check_packed_training takes a transformers model")
    return config
