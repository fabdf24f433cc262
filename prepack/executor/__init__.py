"""The one executor every job runs on: scheduler, KV store and step.

* :mod:`.scheduler`: what each request or shared prefix region feeds a step, within the token and KV budgets;
* :mod:`.regions`: which prompt prefixes are held once as regions, at any depth, and whether a model allows it;
* :mod:`.kvstore`: the per-layer key/value pools, one growing region per request or shared prefix;
* :mod:`.call`: :class:`~.call.PackedCall`, the frozen ``prepack=`` keyword every attention layer reads;
* :mod:`.step`: ``forward_step``, one packed forward over what the scheduler chose, outputs at chosen rows.
"""
