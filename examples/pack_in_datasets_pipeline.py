"""Packing inside a ``datasets`` pipeline: ``Dataset.map(batched=True)`` turns prompts into packed rows.

Each map batch of prompts is packed with :func:`prepack.pack` into rows of at
most ``--capacity`` tokens. Every output row carries the columns a varlen
(flash-attn / ``DataCollatorWithFlattening``-style) training step wants:

* ``input_ids``: the row's tokens, requests back to back, no padding;
* ``position_ids``: restarting at 0 for every request;
* ``cu_seqlens``: request boundaries in the row, ``[0, l0, l0 + l1, ...]``.

Run it offline::

    HF_HUB_OFFLINE=1 python examples/pack_in_datasets_pipeline.py --n 2000 --capacity 2048
"""

from __future__ import annotations

import argparse

import numpy as np

import prepack
from prepack.prompts import load_prompts


def pack_rows(batch: dict, *, capacity: int) -> dict:
    """A ``map(batched=True)`` function: a batch of prompts -> packed rows (fewer rows than prompts).

    Args:
        batch: ``{"input_ids": list of N token lists}``.

    Returns:
        ``{"input_ids", "position_ids", "cu_seqlens", "num_requests"}``, one entry per packed row.
    """
    packed = prepack.pack(batch["input_ids"], capacity, overflow="truncate_right")
    p = packed.plan
    used = p.row_lengths  # (R,) tokens in each row; the rest is padding, dropped here
    ids = packed.input_ids.numpy()
    pos = packed.position_ids.numpy()
    order, ptr = p.order, packed.row_ptr  # requests of row r: order[ptr[r]:ptr[r + 1]], by offset
    out = {"input_ids": [], "position_ids": [], "cu_seqlens": [], "num_requests": []}
    for r in range(p.num_rows):
        lengths = p.lengths[order[ptr[r]: ptr[r + 1]]]
        out["input_ids"].append(ids[r, : used[r]].tolist())
        out["position_ids"].append(pos[r, : used[r]].tolist())
        out["cu_seqlens"].append(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32).tolist())
        out["num_requests"].append(len(lengths))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sharegpt", help="sharegpt, synthetic:lognormal, FILE.jsonl or FILE.txt")
    ap.add_argument("--n", type=int, default=1000, help="prompts to pack")
    ap.add_argument("--capacity", type=int, default=2048, help="tokens per packed row")
    ap.add_argument("--map-batch-size", type=int, default=500, help="prompts per map() batch; packing happens within a batch")
    args = ap.parse_args(argv)

    import datasets

    prompts = load_prompts(args.data, args.n, max_len=args.capacity, on_long="truncate", vocab_size=100352)
    print(prompts.summary())
    ds = datasets.Dataset.from_dict({"input_ids": [list(t) for t in prompts.token_ids]})
    rows = ds.map(
        pack_rows, batched=True, batch_size=args.map_batch_size, remove_columns=ds.column_names,
        fn_kwargs={"capacity": args.capacity}, desc="packing",
    )
    real = sum(len(t) for t in prompts.token_ids)
    padded = len(prompts) * max(len(t) for t in prompts.token_ids)
    print(f"{len(ds)} prompts -> {len(rows)} packed rows of <= {args.capacity} tokens "
          f"({real / (len(rows) * args.capacity):.1%} full; padding every prompt to the longest would fill {real / padded:.1%})")
    first = rows[0]
    print(f"row 0: {first['num_requests']} requests, {len(first['input_ids'])} tokens, cu_seqlens {first['cu_seqlens'][:6]}...")
    # Every request survives: the rows hold exactly the prompts' tokens.
    assert sum(rows["num_requests"]) == len(ds)
    assert sum(len(r) for r in rows["input_ids"]) == real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
