"""The model zoo's hand-made tiny configs (``benchmarks/zoo_configs.py``) name what they claim to.

An override keyed by a misspelt model type would never be read, and the zoo would quietly go back to the generic
shrink; these tests catch that without running the zoo.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ROOT = Path(__file__).resolve().parents[1]


def zoo_configs():
    spec = importlib.util.spec_from_file_location("zoo_configs", ROOT / "benchmarks" / "zoo_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_zoo_table_is_keyed_by_a_causal_lm_model_type():
    zoo = zoo_configs()
    for table in (zoo.OVERRIDES, zoo.CONFIG_TYPE, zoo.DEFAULT_FIXES):
        assert set(table) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), set(table) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_a_redirected_config_type_is_the_config_its_causal_lm_class_takes():
    for model_type, config_type in zoo_configs().CONFIG_TYPE.items():
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        assert isinstance(AutoConfig.for_model(config_type), cls.config_class), (model_type, config_type)
