"""Arrow in and out of the data packer: user data as a ``pyarrow.Table``, list columns as flat numpy, and back.

Every packing front (:mod:`prepack.data`, :mod:`prepack.ray_data`) turns its input into a
``pyarrow.Table`` with :func:`to_table`; the packer (:mod:`prepack.data.packer`) reads each list
column as ``lengths`` (N,) and flat ``values`` (sum(lengths),) with :func:`flat_lists`, and
writes packed columns back with :func:`list_array`. Arrow sources are never copied; Python
sources are converted once, with errors that name the first offending example.

pyarrow is imported when called, so ``import prepack`` works without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa


def to_table(data, column: str, *, first_id: int = 0) -> pa.Table:
    """A Dataset / pyarrow Table / dict of columns / list of token lists as a pyarrow Table (no copy for Arrow sources).

    Args:
        data: the examples; a bare list of token lists becomes the column ``column``.
        column: the column that must be there (the token lists).
        first_id: the number of the first example, for errors (a stream's pools count on).
    """
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes, Mapping)):
        data = {column: data}  # a bare list of token lists
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # a datasets.Dataset
        return data.with_format("arrow")[:]  # honours select()/shuffle() indices
    if column not in data:
        raise ValueError(f"column {column!r} not found; available columns: {list(data)}")
    return pa.table({name: _column_array(name, values, first_id) for name, values in data.items()})


def in_memory_dataset(data, column: str) -> datasets.Dataset:
    """A dict of columns or a list of token lists as an in-memory ``Dataset``, Arrow buffers not copied."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    # A random fingerprint: the default one would hash every token (and Python data has no cache files to hit).
    return datasets.Dataset(InMemoryTable(to_table(data, column)), fingerprint=generate_random_fingerprint())


def pool_columns(pool: list, column: str, first_id: int) -> dict[str, list]:
    """A pool of streamed examples (dicts with the same keys, or bare token lists) as a dict of columns."""
    if not isinstance(pool[0], Mapping):
        return {column: [ex.tolist() if hasattr(ex, "tolist") else ex for ex in pool]}
    keys = list(pool[0])
    for i, ex in enumerate(pool):
        if not isinstance(ex, Mapping) or list(ex) != keys:
            got = list(ex) if isinstance(ex, Mapping) else type(ex).__name__
            if column not in (ex if isinstance(ex, Mapping) else ()):
                raise ValueError(f"example {first_id + i} has no column {column!r}; available columns: {got}")
            raise ValueError(f"example {first_id + i} has columns {got} but example {first_id} has {keys}")
    return {k: [ex[k].tolist() if hasattr(ex[k], "tolist") else ex[k] for ex in pool] for k in keys}


def is_list_type(kind) -> bool:
    """Whether an Arrow type is a list (or large list) type."""
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def flat_lists(col, example_ids: np.ndarray, what: str, *, allow_empty: bool = False, numeric: bool = True):
    """N lists -> lengths (N,) int64 and the flat values (sum(lengths),) as numpy, with errors naming the example.

    Args:
        col: an Arrow list column of N examples.
        example_ids: (N,) the examples' names in errors.
        what: the column in errors (``"column 'input_ids'"``).
        allow_empty: whether an empty list is allowed (it is not for tokens).
        numeric: require integer values (token ids).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = col.type
    if numeric and (not is_list_type(kind) or not pa.types.is_integer(kind.value_type)):
        raise ValueError(f"{what} must hold lists of integer token ids, got {kind} (tokenize the text first)")
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"example {example_ids[i]} has no list in {what} (None)")
    lengths = pc.list_value_length(col).to_numpy().astype(np.int64)
    empty = np.flatnonzero(lengths == 0)
    if len(empty) and not allow_empty:
        i = int(empty[0])
        raise ValueError(
            f"example {example_ids[i]} has an empty list in {what} ({len(empty)} empty example(s)); "
            "every example needs at least one token: filter them out first"
        )
    values = pc.list_flatten(col)
    if values.null_count:
        at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        i = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
        raise ValueError(f"example {example_ids[i]} has a missing (None) value in {what}")
    # one chunk (the usual case) converts without a copy
    values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return lengths, values.to_numpy(zero_copy_only=False)


def list_array(offsets: np.ndarray, values) -> pa.Array:
    """(R + 1,) offsets and flat values (numpy or Arrow) -> an Arrow list array of R lists, ``values`` not copied.

    A large_list once the offsets pass int32.
    """
    import pyarrow as pa

    big = len(offsets) and offsets[-1] > np.iinfo(np.int32).max
    cls = pa.LargeListArray if big else pa.ListArray
    return cls.from_arrays(pa.array(offsets.astype(np.int64 if big else np.int32)), pa.array(values))


def _column_array(name: str, values, first_id: int):
    """One column of Python (or numpy) values as Arrow, naming the first example whose values' type differs."""
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        _raise_mixed(name, values, first_id)
        raise ValueError(f"column {name!r} cannot be converted to Arrow: {e}") from e
    if is_list_type(arr.type) and pa.types.is_floating(arr.type.value_type):
        _raise_mixed(name, values, first_id)  # Arrow quietly reads ints mixed with floats as floats
    return arr


def _raise_mixed(name: str, values, first_id: int) -> None:
    """Raise naming the first example whose values differ in type from the first value seen (or in list-ness)."""
    ref = None  # ((is a list, value type), example) of the first value seen
    for i, row in enumerate(values):
        if row is None:
            continue
        items = row.tolist() if hasattr(row, "tolist") else row
        is_list = isinstance(items, (list, tuple))
        for x in items if is_list else [items]:
            kind = (is_list, type(x))
            if ref is None:
                ref = (kind, i)
            elif kind != ref[0]:
                raise ValueError(
                    f"column {name!r} mixes types: example {first_id + i} holds {_describe(kind)}, but example "
                    f"{first_id + ref[1]} holds {_describe(ref[0])}; a column must hold one type"
                )


def _describe(kind: tuple[bool, type]) -> str:
    is_list, t = kind
    return f"lists of {t.__name__}" if is_list else f"a {t.__name__}"
