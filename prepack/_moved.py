"""The module paths of the flat layout (before the subpackages), kept for one release.

``import prepack.engine`` (or any other old path) still works, warns, and gives the module at its new place.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "layout": "planner.layout", "balance": "planner.balance", "pieces": "planner.pieces",
    "kernels": "attention.cuda", "backends": "attention.registry", "masks": "attention.masks", "cascade": "attention.cascade",
    "step": "executor.call", "scheduler": "executor.scheduler", "kvstore": "executor.kvstore", "prefix_regions": "executor.regions",
    "kvcache": "jobs.caches", "outputs": "jobs.outputs", "scoring": "jobs.scoring", "heads": "jobs.heads",
    "generation": "jobs.generation", "engine": "jobs.engine", "decoding": "jobs.decoding", "result": "jobs.result",
    "support": "hf.support", "rope": "hf.rope", "wrapped": "hf.wrapped", "vision": "hf.vision", "inputs": "hf.inputs",
    "forward": "hf.model", "packer": "data.packer", "arrow": "data.arrow", "packing": "data.batch", "stream": "data.stream",
    "sampler": "data.sampler", "training": "data.training", "packed_training_models": "data.packed_training_models",
    "cli_args": "cli.args",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``prepack.<old>`` only where no module of that name exists, and loads the module at its new place."""

    def find_spec(self, fullname, path, target=None):
        head, _, name = fullname.partition(".")
        if head == "prepack" and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = "prepack." + MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Put the finder last on ``sys.meta_path`` (once): real modules are always found first."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
