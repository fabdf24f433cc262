"""prepack: run many prompts through a transformers model without padding, each exactly as if alone.

Start with :func:`generate` (results are :class:`Generation`), :func:`prefill` (logits and per-request
caches), :func:`score` (log-likelihoods, lm-eval) or :func:`pack_dataset` (padding-free training rows);
docs/api.md has every public name with an example. The data flow, one module per step::

    prompts --inputs--> token arrays
    lengths --planner--> Plan --packing--> PackedBatch (offsets, positions, cu_seqlens: layout)   [data pipelines]
    one executor for every job: scheduler (what each request or shared prefix region feeds this step)
        --kvstore (keys later steps read)--> executor.forward_step (one packed forward; attention, kernels,
        hf, support) --> outputs at the rows asked for
    generation: engine (samples from each step's last-token logits, never model.generate)
                --result--> one Generation per request
    prefill-only jobs: jobs.run_jobs (samples nothing; outputs at spans) --prefill--> per-request caches (kvcache)
                       --outputs--> forward_at --scoring--> score, score_rolling; --heads--> classify, embed

``prepack.data`` packs whole ``datasets`` tables for offline inference and padding-free training (the
packer itself is ``prepack.data.packer``, its Arrow conversion ``prepack.data.arrow``),
``prepack.collate`` turns packed rows into ``Trainer`` batches (``prepack.collate_vision``: vision-language
examples, with the model's own mRoPE positions), and ``prepack.ray_data`` runs both
packing and batch inference on Ray Data.
"""

from . import _moved
from .attention.registry import BACKENDS, get_backend, resolve_backend
from .collate import DataCollatorForPackedRows, to_flash_kwargs
from .collate_vision import DataCollatorForPackedVisionRows
from .data.fronts import PackStats, pack_dataset, pack_examples, pack_iterable, pack_iterable_dataset, pack_stats, pack_table
from .jobs.outputs import forward_at
from .jobs.completions import logprobs
from .jobs.generation import generate, generate_iter
from .jobs.result import VLLM_FINISH_REASON, Generation
from .jobs.heads import classify, embed
from .hf.registration import ATTN_IMPLEMENTATION, disable, enable
from .hf.registration import register as _register
from .jobs.caches import FlashKVCache
from .data.batch import PackedBatch, Varlen, pack
from .planner.bins import ALGORITHMS, Plan, lower_bound_l1, lower_bound_l2, plan
from .jobs.prefill import PrefillResult, prefill
from .jobs.scoring import Score, rolling_windows, score, score_rolling
from .hf.support import UnsupportedModelError

_moved.install()

try:  # transformers is the [hf] extra: without it, planning and packing still work
    _register()
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = [
    "ALGORITHMS",
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "DataCollatorForPackedRows",
    "DataCollatorForPackedVisionRows",
    "FlashKVCache",
    "Generation",
    "PackStats",
    "PackedBatch",
    "PackedRowSampler",
    "PackedTrainingCallback",
    "Plan",
    "PrefillResult",
    "Score",
    "Varlen",
    "check_packed_training",
    "classify",
    "disable",
    "embed",
    "enable",
    "forward_at",
    "generate",
    "generate_iter",
    "logprobs",
    "get_backend",
    "lower_bound_l1",
    "lower_bound_l2",
    "pack",
    "pack_dataset",
    "pack_examples",
    "pack_iterable",
    "pack_iterable_dataset",
    "pack_stats",
    "pack_table",
    "plan",
    "prefill",
    "resolve_backend",
    "rolling_windows",
    "score",
    "score_rolling",
    "to_flash_kwargs",
    "UnsupportedModelError",
    "VLLM_FINISH_REASON",
]
__version__ = "0.1.0"

# Training helpers subclass transformers' Trainer classes, whose import pulls in the Trainer's dependencies
# (peft, accelerate: seconds): they load on first use, not with ``import prepack``.
_LAZY = {"PackedRowSampler": "data.sampler", "PackedTrainingCallback": "data.training", "check_packed_training": "data.training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
