"""prepack.ray_data: packing as a Ray Data stage and batch inference in a Ray actor pool (a local 2-CPU cluster)."""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import prepack  # noqa: E402
from prepack.data.fronts import pack_table  # noqa: E402
from prepack.ray_data import PrepackPredictor, pack_ray_dataset  # noqa: E402

from .models import alone_last_logits, build, prompts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """One local Ray cluster for every test here (starting one costs seconds). Workers import this checkout."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def corpus(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, n)
    return pa.table({"input_ids": [rng.integers(3, 100, k).tolist() for k in lengths], "doc": np.arange(n)})


def row_set(table):
    return sorted(zip(map(tuple, table.column("input_ids").to_pylist()), map(tuple, table.column("seq_lengths").to_pylist()), strict=True))


def test_the_ray_stage_packs_each_pool_like_pack_table():
    table = corpus(300)
    # Ray cuts batches from bundles of whole blocks; with blocks of pool_size rows each pool is one block
    blocks = [table.slice(i, 100) for i in range(0, 300, 100)]
    ds = pack_ray_dataset(ray.data.from_arrow(blocks), 64, pool_size=100, id_column="doc", schema="full")
    got = pa.Table.from_pylist(ds.take_all())
    want = pa.concat_tables([pack_table(table.slice(i, 100).drop_columns(["doc"]), 64) for i in range(0, 300, 100)])
    assert row_set(got) == row_set(want)
    assert sorted(i for ids in got.column("example_ids").to_pylist() for i in ids) == list(range(300))


def test_a_ray_dataset_without_the_column_is_refused_at_once():
    ds = ray.data.from_items([{"tokens": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"the Ray dataset has no column 'input_ids'; available columns: \['tokens'\]"):
        pack_ray_dataset(ds, 8)


def test_a_bad_option_is_refused_when_the_ray_stage_is_built():
    ds = ray.data.from_items([{"input_ids": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"overflow must be one of .*, got 'drop'"):
        pack_ray_dataset(ds, 8, overflow="drop")  # before any Ray task runs


def test_a_bad_example_in_a_ray_stage_is_named_by_its_id():
    table = pa.table({"input_ids": [[1, 2], [1] * 9], "doc": [70, 71]})
    # Ray re-raises a task's ValueError as a RayTaskError carrying its message
    with pytest.raises(ray.exceptions.RayTaskError, match="ValueError: example 71 has 9 tokens but capacity is 8"):
        pack_ray_dataset(ray.data.from_arrow(table), 8, id_column="doc").take_all()


def load_llama():
    return build("llama")


def test_prefill_in_a_ray_actor_pool_matches_each_prompt_alone():
    seqs = prompts([5, 17, 3, 9, 12, 1, 8])
    ds = ray.data.from_items([{"input_ids": s.tolist(), "i": i} for i, s in enumerate(seqs)])
    out = ds.map_batches(
        PrepackPredictor, fn_constructor_kwargs={"load_model": load_llama, "task": "prefill"},
        batch_size=4, concurrency=1,
    ).take_all()
    got = torch.tensor(np.stack([r["last_logits"] for r in sorted(out, key=lambda r: r["i"])]))
    torch.testing.assert_close(got, alone_last_logits(load_llama(), seqs), atol=1e-4, rtol=0)


def test_generate_in_a_ray_actor_pool_gives_prepack_generate_tokens():
    seqs = prompts([5, 11, 3], seed=1)
    ds = ray.data.from_items([{"input_ids": s.tolist(), "i": i} for i, s in enumerate(seqs)])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    out = ds.map_batches(
        PrepackPredictor, fn_constructor_kwargs={"load_model": load_llama, "task": "generate", **kwargs},
        batch_size=3, concurrency=1,
    ).take_all()
    got = [list(r["generated_ids"]) for r in sorted(out, key=lambda r: r["i"])]
    want = [g.tokens.tolist() for g in prepack.generate(load_llama(), seqs, **kwargs)]
    assert got == want
