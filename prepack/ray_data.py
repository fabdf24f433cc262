"""Ray Data stages: packing over a cluster's blocks, and batch inference in an actor pool that holds the model.

Packing is one ``map_batches`` stage running the packer (:mod:`prepack.data.packer`,
with its options validated once when the stage is built) on each batch of
``pool_size`` consecutive rows::

    ds = ray.data.read_parquet("s3://bucket/tokenized/")           # any Ray dataset with an input_ids column
    packed = pack_ray_dataset(ds, 4096, pool_size=100_000)         # lazy, like every Ray Data stage
    packed.write_parquet("s3://bucket/packed/")

A pool is one Ray batch: ``pool_size`` consecutive rows of the blocks one task
reads (Ray bundles whole blocks, so the last batch of a bundle may be smaller).
Each pool is planned on its own, so the pool size trades fill against memory
and parallelism: a pool holds ``pool_size`` examples in one worker, and rows
never mix examples of two pools. On ShareGPT prompt lengths (capacity 4096)
pools of 10k, 100k and 1M examples use 0.089%, 0.0078% and 0.0013% more rows
than one plan over everything (docs/data_pipeline.md has the table).

Batch inference runs :class:`PrepackPredictor` as a Ray Data actor pool: each
actor loads the model once, then runs a packed prefill (or ``generate``) over
every batch of token lists it is sent::

    out = ds.map_batches(
        PrepackPredictor, fn_constructor_kwargs={"load_model": load, "task": "prefill"},
        batch_size=256, concurrency=4, num_gpus=1,
    )

The same code runs on a laptop (``ray.init()``) and on a multi-node cluster
(``ray.init(address="auto")`` on a node of a cluster started with
``ray start --head`` / ``ray start --address=...``, or a KubeRay cluster):
Ray schedules the packing tasks and the actors across nodes; ``prepack`` (and
the model's dependencies) must be installed on every node, or shipped with
``runtime_env={"pip": [...]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .data.packer import Algorithm, Overflow, PackOptions, ScalarColumns, Schema, check_pool_size, log_cuts, pack_with_cuts

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

TASKS: tuple[str, ...] = ("prefill", "generate")


def pack_ray_dataset(
    ds: ray.data.Dataset,
    capacity: int,
    column: str = "input_ids",
    *,
    pool_size: int = 100_000,
    id_column: str | None = None,
    schema: Schema = "lean",
    scalar_columns: ScalarColumns = "drop",
    algorithm: Algorithm = "bfd",
    overflow: Overflow = "error",
    pad_id: int | None = None,
    max_per_row: int | None = None,
    **map_batches_kwargs: Any,
) -> ray.data.Dataset:
    """Pack a Ray dataset of token lists as a ``map_batches`` stage, one plan per ``pool_size`` rows.

    Args:
        ds: a ``ray.data.Dataset`` with a ``column`` of token-id lists.
        capacity: tokens per row.
        pool_size: rows planned together (Ray's ``batch_size``); see the module docstring for the trade-off.
        id_column: a column naming each example (e.g. its index in the corpus): errors name
            examples by it and the full schema's ``example_ids`` hold it. Without it, examples are
            numbered from 0 within each pool.
        schema, scalar_columns, algorithm, overflow, pad_id, max_per_row: the packer's options, see
            :class:`prepack.data.packer.PackOptions`; checked when the stage is built.
        **map_batches_kwargs: passed to ``map_batches`` (``concurrency``, ``num_cpus``, ...).

    Returns:
        The packed rows, a lazy ``ray.data.Dataset`` with the columns of :mod:`prepack.data`.

    Raises:
        ValueError: at once for a bad option, or when ``column`` or ``id_column`` is not in the
            dataset (naming the available ones); while the stage runs, naming the first bad example.
    """
    options = PackOptions(capacity, column, schema, scalar_columns, algorithm, overflow, pad_id, max_per_row)
    if check_pool_size(pool_size) is None:
        raise ValueError("pool_size must be an integer >= 1 (Ray's batch_size), got None")
    names = ds.schema().names
    for name in (column, id_column):
        if name is not None and name not in names:
            raise ValueError(f"the Ray dataset has no column {name!r}; available columns: {names}")
    return ds.map_batches(
        pack_pool, batch_size=pool_size, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs={"options": options, "id_column": id_column}, **map_batches_kwargs,
    )


def pack_pool(table: pa.Table, *, options: PackOptions, id_column: str | None = None) -> pa.Table:
    """One Ray batch (a pool of examples, a ``pyarrow.Table``) -> its packed rows; the function the stage maps.

    Args:
        table: the pool, N rows.
        options: how to pack (validated when the stage was built).
        id_column: the column naming each example, dropped from the rows (None: number them from 0).
    """
    ids = None
    if id_column is not None:
        ids = table.column(id_column).to_numpy()
        table = table.drop_columns([id_column])
    try:
        packed, cuts = pack_with_cuts(table, options, example_ids=ids)
        log_cuts(cuts, options)
        return packed
    except ValueError as e:
        where = f"in a pool of {table.num_rows} examples"
        hint = "" if id_column else " numbered from 0 in this pool (pass id_column= to name them by a column)"
        raise ValueError(f"{e} ({where}{hint})") from e


class PrepackPredictor:
    """A Ray Data actor that holds one model and runs prepack over each batch of token lists.

    Use it as the callable class of ``map_batches`` (Ray builds one per actor
    and keeps it for every batch the actor gets)::

        ds.map_batches(PrepackPredictor, fn_constructor_kwargs={"load_model": load, "task": "generate",
                       "max_new_tokens": 32}, batch_size=64, concurrency=2)

    Each batch gains the output columns of the task, in row order:

    * ``"prefill"``: ``last_logits`` (V,) float32 per row, from :func:`prepack.prefill`;
    * ``"generate"``: ``generated_ids``, the new tokens of each row (a list of
      ints ending at its EOS), from :func:`prepack.generate`.

    Args:
        load_model: a picklable function returning the model, called once per actor (load
            weights here, on the actor's device, rather than shipping a model to every actor).
        task: ``"prefill"`` or ``"generate"``.
        column: the column of token-id lists.
        **task_kwargs: passed to the prepack call (``backend``, ``token_budget``, ``max_new_tokens``, ...).
    """

    def __init__(self, load_model: Callable[[], Any], task: str = "prefill", column: str = "input_ids", **task_kwargs):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.model = load_model()
        self.task, self.column, self.task_kwargs = task, column, task_kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.column not in batch:
            raise ValueError(f"the batch has no column {self.column!r}; available columns: {list(batch)}")
        prompts = [np.asarray(t, dtype=np.int64) for t in batch[self.column]]
        return {**batch, **getattr(self, self.task)(prompts)}

    def prefill(self, prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
        from .jobs.prefill import prefill

        logits = prefill(self.model, prompts, **self.task_kwargs).logits
        return {"last_logits": logits.float().cpu().numpy()}

    def generate(self, prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
        from .jobs.generation import generate

        new = generate(self.model, prompts, **self.task_kwargs)
        out = np.empty(len(new), dtype=object)
        out[:] = [g.tokens.cpu().numpy() for g in new]
        return {"generated_ids": out}
