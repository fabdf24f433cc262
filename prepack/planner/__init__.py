"""The planner: which request goes to which row and offset (numpy only; nothing here imports torch).

* :mod:`.bins`: ``plan(lengths, capacity)`` and :class:`Plan`, the bin-packing algorithms and their lower bounds;
* :mod:`.layout`: offsets, position ids, ``cu_seqlens``, gather/scatter indices and :class:`~.layout.Parts`,
  derived from segment lengths, the one source of truth every module lays tokens out with;
* :mod:`.pieces`: cutting examples into pieces before they are placed (TRL's ``bfd_split`` and ``wrapped``);
* :mod:`.balance`: packed rows dealt to optimizer steps, ranks and micro-steps.
"""

from .bins import ALGORITHMS, Plan, check_capacity, lower_bound_l1, lower_bound_l2, plan

__all__ = ["ALGORITHMS", "Plan", "check_capacity", "lower_bound_l1", "lower_bound_l2", "plan"]
