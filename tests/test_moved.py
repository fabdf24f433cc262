"""The flat layout's module paths import for one release, with a DeprecationWarning, as the module at its new place."""

import importlib
import sys

import pytest

import prepack
from prepack._moved import MOVED


@pytest.mark.parametrize("old", ["engine", "kvcache", "packing", "backends", "layout"])
def test_an_old_module_path_warns_and_is_the_module_at_its_new_place(old):
    sys.modules.pop(f"prepack.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"prepack.{old} moved to prepack.{MOVED[old]}"):
        module = importlib.import_module(f"prepack.{old}")
    assert module is importlib.import_module(f"prepack.{MOVED[old]}")


def test_every_old_path_names_a_module_that_exists():
    for old, new in MOVED.items():
        assert importlib.util.find_spec(f"prepack.{new}") is not None, (old, new)


def test_the_public_api_is_unchanged_by_the_move():
    assert prepack.prefill.__module__ == "prepack.jobs.prefill"
    assert prepack.plan.__module__ == "prepack.planner.bins"
    from prepack.data import pack_dataset
    from prepack.planner import plan

    assert pack_dataset is prepack.pack_dataset and plan is prepack.plan
