"""The jobs, each a run of the executor: ``generate`` samples from each step's last-token logits; the prefill-only
jobs sample nothing and collect outputs at spans.

* :mod:`.run`: ``run_jobs``, the prefill-only run; :mod:`.prefill` (per-request caches, gathered by :mod:`.caches`),
  :mod:`.outputs` (``forward_at``), :mod:`.scoring` (lm-eval's log-likelihoods), :mod:`.heads` (``classify``,
  ``embed``);
* :mod:`.generation` (``generate``, ``generate_iter``), :mod:`.engine` (the decode loop), :mod:`.decoding` (each
  request's processors and stopping criteria, as ``model.generate`` builds them), :mod:`.result` (``Generation``).
"""
