"""Packing inside a ``datasets`` pipeline: tokenized prompts -> packed rows for padding-free training.

Two ways to pack the same dataset, both from :mod:`prepack.data`:

* ``Dataset.map(pack_examples, batched=True)``: each map batch is planned on
  its own (as TRL's ``pack_dataset`` does); works with ``num_proc`` and caching;
* ``pack_dataset``: one plan over the whole dataset, so rows are as full as the
  lengths allow (at or next to the L2 lower bound on rows).

Every packed row has ``input_ids``, ``labels``, ``position_ids`` (restarting
at 0 for each prompt), ``seq_lengths``, ``cu_seqlens`` (``[0, l0, l0 + l1, ...]``),
``example_ids`` and ``truncated``; ``to_flash_kwargs`` collates rows into the
kwargs of a varlen (``DataCollatorWithFlattening``-style) training step.

Run it offline::

    HF_HUB_OFFLINE=1 python examples/pack_in_datasets_pipeline.py --n 2000 --capacity 2048
"""

from __future__ import annotations

import argparse

from prepack import pack_dataset, pack_examples, pack_stats, to_flash_kwargs
from prepack.bench import load_prompts


def pack_per_batch(ds, capacity: int, batch_size: int, num_proc: int | None = None):
    """Pack with ``Dataset.map(batched=True)``: the plan sees one map batch at a time.

    Args:
        ds: a ``datasets.Dataset`` with an ``input_ids`` column of N token lists.

    Returns:
        A ``datasets.Dataset`` of packed rows (the columns of :mod:`prepack.data`).
    """
    # The arrow format hands pack_examples a pyarrow.Table, no Python list per example;
    # with_indices makes example_ids (and error messages) count across the whole dataset.
    return ds.with_format("arrow").map(
        pack_examples, batched=True, batch_size=batch_size, with_indices=True, num_proc=num_proc,
        remove_columns=ds.column_names,  # N examples become fewer rows, so no source column can stay
        fn_kwargs={"capacity": capacity}, desc="packing per map batch",
    ).with_format(None)


def report(name: str, ds, rows, capacity: int) -> None:
    """Print rows and fill of a packing, and check that it kept every example and token."""
    s = pack_stats(rows, capacity)
    print(f"{name}: {len(ds)} prompts -> {s.num_rows} packed rows of <= {capacity} tokens "
          f"({s.efficiency:.2%} full; L2 bound {s.lower_bound_l2} rows, {s.gap_to_l2:+.2%})")
    assert s.num_examples == len(ds) and s.num_truncated_tokens == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sharegpt", help="sharegpt, synthetic:lognormal, FILE.jsonl or FILE.txt")
    ap.add_argument("--n", type=int, default=1000, help="prompts to pack")
    ap.add_argument("--capacity", type=int, default=2048, help="tokens per packed row")
    ap.add_argument("--map-batch-size", type=int, default=500, help="prompts per map() batch; the per-batch plan sees only these")
    ap.add_argument("--num-proc", type=int, default=None, help="processes for map()")
    args = ap.parse_args(argv)

    import datasets

    prompts = load_prompts(args.data, args.n, max_len=args.capacity, on_long="truncate", vocab_size=100352)
    print(prompts.summary())
    ds = datasets.Dataset.from_dict({"input_ids": [list(t) for t in prompts.token_ids]})

    per_batch = pack_per_batch(ds, args.capacity, args.map_batch_size, args.num_proc)
    report(f"map(pack_examples, batch_size={args.map_batch_size})", ds, per_batch, args.capacity)
    whole = pack_dataset(ds, args.capacity)
    report("pack_dataset (whole dataset)", ds, whole, args.capacity)

    real = sum(len(t) for t in prompts.token_ids)
    padded = len(prompts) * max(len(t) for t in prompts.token_ids)
    print(f"(padding every prompt to the longest would fill {real / padded:.1%})")
    busiest = max(whole, key=lambda row: len(row["seq_lengths"]))
    print(f"fullest row by count: prompts {busiest['example_ids'][:6]}... ({len(busiest['seq_lengths'])} in all), "
          f"{len(busiest['input_ids'])} tokens, cu_seqlens {busiest['cu_seqlens'][:6]}...")
    # bfd puts the longest prompts first: shuffle the packed rows before training
    batch = to_flash_kwargs(list(whole.shuffle(seed=0).select(range(min(2, len(whole))))))
    print(f"2 rows collated for padding-free training: input_ids {tuple(batch['input_ids'].shape)}, "
          f"cu_seq_lens_q {tuple(batch['cu_seq_lens_q'].shape)} {batch['cu_seq_lens_q'].dtype}, "
          f"max_length_q {batch['max_length_q']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
