"""prepack: sequence packing for LLM prefill and data pipelines.

The data flow, one module per step::

    lengths --planner--> Plan --packing--> PackedBatch --attention/hf--> prefill --kvcache--> per-request caches
"""

from .attention import BACKENDS, get_backend, resolve_backend
from .generation import generate
from .kvcache import FlashKVCache
from .packing import PackedBatch, Varlen, pack
from .planner import ALGORITHMS, Plan, lower_bound_l1, lower_bound_l2, plan
from .prefill import PrefillResult, prefill

from .hf import ATTN_IMPLEMENTATION, register as _register

try:  # transformers is the [hf] extra: without it, planning and packing still work
    _register()
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "FlashKVCache",
    "PrefillResult",
    "ATTN_IMPLEMENTATION",
    "generate",
    "get_backend",
    "prefill",
    "resolve_backend",
    "PackedBatch",
    "Plan",
    "Varlen",
    "lower_bound_l1",
    "lower_bound_l2",
    "pack",
    "plan",
]
__version__ = "0.1.0"
