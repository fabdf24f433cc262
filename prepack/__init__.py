"""prepack: sequence packing for LLM prefill and data pipelines.

The data flow, one module per step::

    lengths --planner--> Plan --packing--> PackedBatch --attention, hf--> prefill --kvcache--> per-request caches
                                                                                  --generation--> model.generate

``prepack.data`` packs whole ``datasets`` tables for offline inference and padding-free training,
``prepack.collate`` turns packed rows into ``Trainer`` batches, and ``prepack.ray_data`` runs both
packing and batch inference on Ray Data.
"""

from .attention import BACKENDS, get_backend, resolve_backend
from .collate import DataCollatorForPackedRows, to_flash_kwargs
from .data import PackStats, pack_dataset, pack_examples, pack_iterable, pack_stats, pack_table
from .generation import generate, generate_iter
from .hf import ATTN_IMPLEMENTATION
from .hf import register as _register
from .kvcache import FlashKVCache
from .packing import PackedBatch, Varlen, pack
from .planner import ALGORITHMS, Plan, lower_bound_l1, lower_bound_l2, plan
from .prefill import PrefillResult, prefill
from .support import UnsupportedModelError

try:  # transformers is the [hf] extra: without it, planning and packing still work
    _register()
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = [
    "ALGORITHMS",
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "DataCollatorForPackedRows",
    "FlashKVCache",
    "PackStats",
    "PackedBatch",
    "Plan",
    "PrefillResult",
    "Varlen",
    "generate",
    "generate_iter",
    "get_backend",
    "lower_bound_l1",
    "lower_bound_l2",
    "pack",
    "pack_dataset",
    "pack_examples",
    "pack_iterable",
    "pack_stats",
    "pack_table",
    "plan",
    "prefill",
    "resolve_backend",
    "to_flash_kwargs",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
