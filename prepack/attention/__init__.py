"""Attention over a packed layout: the kernels, their one registry, masks and merged prefix parts.

* :mod:`.functions`: the backends that run on any device, with flash-attn's ``flash_attn_varlen_func`` signature
  (``sdpa_varlen``, ``sdpa_masked``, ``flex``, the float64 ``reference``);
* :mod:`.cuda`: the CUDA kernels (flash-attn 2/4, PyTorch's ``varlen_attn``) and the probes of what is installed;
* :mod:`.registry`: every :class:`~.registry.Kernel` and what it declares; ``choose`` decides once per call;
* :mod:`.masks`: windows as flash-attn normalises them and the one dense block-diagonal mask builder;
* :mod:`.cascade`: attention merged from parts (a shared prefix region, a chunk's earlier keys) by log-sum-exp.
"""
