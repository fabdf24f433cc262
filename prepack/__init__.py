"""prepack: sequence packing for LLM prefill and data pipelines.

The data flow, one module per step::

    lengths --planner--> Plan --packing--> PackedBatch --attention/hf--> prefill --kvcache--> per-request caches
"""

from .packing import PackedBatch, Varlen, pack
from .planner import ALGORITHMS, Plan, lower_bound_l1, lower_bound_l2, plan

__all__ = [
    "ALGORITHMS",
    "PackedBatch",
    "Plan",
    "Varlen",
    "lower_bound_l1",
    "lower_bound_l2",
    "pack",
    "plan",
]
__version__ = "0.1.0"
