"""transform: a batch of raw rows -> ids (B, F) int64, values (B, F) float32, label (B,) float32.

Pure and vectorised (no Python loop over rows), so it runs inside Ray Data `map_batches`.
Each field gives `width` id columns, in spec order: a categorical or numeric field one column
with value 1.0; a multi-valued field (MovieLens genres, libSVM idx) up to `width` (id, value)
pairs, values 1/n for n items (libSVM: its own val), the rest padding (id 0, value 0.0); items
past the width are dropped and n counts the kept ones. A null list gives the field's null id.
hashing.py documents the map from a raw value to a row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ravfm.errors import UserError
from ravfm.features.hashing import (
    HASH_FUNCTION,
    NULL_KEY,
    criteo_bucket_hashes,
    mix64,
    null_hash,
    quantile_bucket,
    xxh3_expr,
)
from ravfm.features.kernels import arrow_int_column, hash_int_fields, remap_rows
from ravfm.features.spec import FeatureSpec, FieldSpec

__all__ = [
    "transform",
    "transform_arrow",
    "check_schema",
    "field_hashes",
    "field_ids",
    "multi_items",
]

_STRINGS = ("String", "Utf8")  # xxh3 reads the UTF-8 bytes; categoricals would hash codes
_INTS = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
_FLOATS = ("Float32", "Float64")


def _dtype_ok(f: FieldSpec, dtype: str) -> bool:
    if f.kind == "multi":
        if not dtype.startswith("List("):
            return False
        dtype = dtype[5:-1]
    if f.kind == "numeric":
        return dtype in _INTS or dtype in _FLOATS
    return dtype in (_STRINGS if f.hasher == HASH_FUNCTION else _INTS)


def _schema_dict(schema: Any) -> dict[str, str]:
    if isinstance(schema, pa.Schema):
        schema = pl.from_arrow(schema.empty_table()).schema
    return {str(k): str(v) for k, v in dict(schema).items()}


def check_schema(schema: dict | pa.Schema | pl.Schema, spec: FeatureSpec) -> None:
    """Raise one-line UserError if a column the spec hashes is missing or has the wrong type."""
    have = _schema_dict(schema)
    for f in spec.fields:
        for col in (f.name, f.value_column):
            if col is not None and col not in have:
                raise UserError(
                    f"the data has no column {col!r}, which the feature spec "
                    f"({spec.dataset}, fields {', '.join(x.name for x in spec.fields)}) "
                    "needs; use shards of the same dataset or re-run `ravfm stats`"
                )
        if not _dtype_ok(f, have[f.name]):
            raise UserError(
                f"column {f.name!r} is {have[f.name]} but the feature spec hashes it "
                f"as {f.dtype} ({f.kind}); use shards converted the same way or "
                "re-run `ravfm stats` on these"
            )


def _pl_dtype(name: str) -> pl.DataType:
    if name.startswith("List(") and name.endswith(")"):
        return pl.List(_pl_dtype(name[5:-1]))
    return getattr(pl, name)


def _from_numpy(name: str, v: Any, dtype: str | None) -> pl.Series:
    v = np.asarray(v)
    if v.dtype == object:  # strings or lists, with None for null
        s = pl.Series(name, pa.array(list(v), from_pandas=True))
    else:
        s = pl.Series(name, v, nan_to_null=v.dtype.kind == "f")
    return s if dtype is None or str(s.dtype) == dtype else s.cast(_pl_dtype(dtype))


def _as_polars(batch: Any, spec: FeatureSpec) -> pl.DataFrame:
    """The columns the spec reads (others are never converted), as a Polars frame."""
    need = {*spec.columns, spec.label}
    if isinstance(batch, pl.DataFrame):
        return batch.select([c for c in batch.columns if c in need])
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, pa.Table):
        return pl.from_arrow(batch.select([c for c in batch.column_names if c in need]))
    if isinstance(batch, dict):  # Ray Data numpy batches: object arrays for strings and lists
        dtypes = {f.name: f.dtype for f in spec.fields}
        return pl.DataFrame([_from_numpy(k, v, dtypes.get(k)) for k, v in batch.items()])
    raise TypeError(f"transform takes a pyarrow.Table, polars.DataFrame or dict, not {type(batch)}")


def _int_keys_expr(f: FieldSpec) -> pl.Expr:
    """int64 integer values (floats floored), null -> NULL_KEY."""
    e = pl.col(f.name)
    if f.dtype in _FLOATS:
        e = e.fill_nan(None).floor().clip(-(2.0**63), 2.0**63 - 1024)
    return e.cast(pl.Int64).fill_null(NULL_KEY)


def _hash_keys(keys: np.ndarray, f: FieldSpec, *, in_place: bool = False) -> np.ndarray:
    """uint64 (B,) hashes of an integer field's int64 keys (B,); in_place: overwrite keys."""
    if f.kind == "numeric":
        return criteo_bucket_hashes(keys, f.seed)
    return mix64(keys, f.seed, out=keys if in_place else None)


def field_hashes(df: pl.DataFrame, f: FieldSpec) -> np.ndarray:
    """uint64 (B,) hashes of one scalar (categorical or numeric) field."""
    if f.hasher == HASH_FUNCTION and f.kind == "categorical":
        return df.select(xxh3_expr(pl.col(f.name), f.seed)).to_series().to_numpy()
    if f.kind == "numeric" and f.bucketiser == "quantile":
        x = df.select(pl.col(f.name).cast(pl.Float64).fill_nan(None)).to_series()
        keys = quantile_bucket(x.fill_null(0.0).to_numpy(), np.asarray(f.edges, np.float64))
        keys[x.is_null().to_numpy()] = NULL_KEY
        return mix64(keys, f.seed)
    return _hash_keys(df.select(_int_keys_expr(f)).to_series().to_numpy(), f)


def multi_items(df: pl.DataFrame, f: FieldSpec) -> tuple[np.ndarray, ...]:
    """Every item of a multi-valued field, flat: (row, pos, id, value), each (M,).

    row: batch row of the item; pos: its place in the row's list; id: its table row; value:
    1/n for n items in the row (or the libSVM val, unscaled). A null list is one null item.
    """
    arr = df[f.name].to_arrow()
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    lens_a = pc.list_value_length(arr)
    null_rows = np.flatnonzero(np.asarray(lens_a.is_null()))
    lens = np.asarray(lens_a.fill_null(0), dtype=np.int64)
    flat = pl.Series("v", pc.list_flatten(arr))
    if f.hasher == HASH_FUNCTION:
        h = flat.to_frame().select(xxh3_expr(pl.col("v"), f.seed)).to_series().to_numpy()
    else:
        h = mix64(flat.cast(pl.Int64).fill_null(NULL_KEY).to_numpy(), f.seed)
    rows = np.repeat(np.arange(df.height), lens)
    pos = np.arange(len(h)) - np.repeat(np.cumsum(lens) - lens, lens)
    if f.value_column is not None:
        vcol = df[f.value_column].to_arrow()
        vcol = vcol.combine_chunks() if isinstance(vcol, pa.ChunkedArray) else vcol
        vals = np.asarray(pc.list_flatten(vcol).fill_null(1.0), dtype=np.float32)
        if len(vals) != len(h):
            raise UserError(
                f"columns {f.name!r} and {f.value_column!r} hold lists of different "
                "lengths; re-convert the libSVM data"
            )
    else:
        vals = (1.0 / np.maximum(lens, 1)).astype(np.float32)[rows]
    if len(null_rows):
        rows = np.concatenate([rows, null_rows])
        pos = np.concatenate([pos, np.zeros(len(null_rows), np.int64)])
        h = np.concatenate([h, np.full(len(null_rows), null_hash(f.seed), np.uint64)])
        vals = np.concatenate([vals, np.ones(len(null_rows), np.float32)])
    ids = (h & np.uint64(f.buckets - 1)).astype(np.int64) + f.offset
    return rows, pos, ids, vals


def _multi(df: pl.DataFrame, f: FieldSpec, b: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, W) int64 and values (B, W) float32 of one multi-valued field, padded with 0."""
    rows, pos, item_ids, vals = multi_items(df, f)
    keep = pos < f.width
    rows, pos = rows[keep], pos[keep]
    ids = np.zeros((b, f.width), np.int64)
    ids[rows, pos] = item_ids[keep]
    values = np.zeros((b, f.width), np.float32)
    if f.value_column is not None:
        values[rows, pos] = vals[keep]
    else:  # 1/n over the kept items
        n = np.bincount(rows, minlength=b).astype(np.float32)
        values[rows, pos] = 1.0 / n[rows]
    return ids, values


def field_ids(df: pl.DataFrame, f: FieldSpec) -> np.ndarray:
    """int64 (B,) table rows of one scalar field, before min-count folding."""
    return (field_hashes(df, f) & np.uint64(f.buckets - 1)).astype(np.int64) + f.offset


def _rows(h: np.ndarray, f: FieldSpec, remap: tuple | None) -> np.ndarray:
    """Table rows of one scalar field: uint64 hashes (B,), overwritten -> int64 (B,) rows.

    hashed row = offset + (h & (buckets - 1)); with a compact spec (remap: its table, see
    FeatureSpec.remap) the kept row's compact row, or the field's OOV row for one not kept.
    """
    np.bitwise_and(h, np.uint64(f.buckets - 1), out=h)
    r = h.view(np.int64)
    r += f.offset
    if remap is not None:
        remap_rows(r, remap, f.oov_row)
    return r


def _int_column(df: pl.DataFrame, arrow: pa.Table | None, f: FieldSpec) -> tuple | None:
    """The kernel's view of an integer field's column (see kernels.arrow_int_column), or None."""
    return arrow_int_column(arrow.column(f.name) if arrow is not None else df[f.name].to_arrow())


def _writable(a: np.ndarray) -> np.ndarray:
    """a itself when it may be overwritten (uint64 view), else a copy."""
    a = a if a.flags.writeable else a.copy()
    return a.view(np.uint64)


def transform(batch: Any, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Raw batch -> {"ids": (B, F) int64, "values": (B, F) float32, "label": (B,) float32}.

    batch: pyarrow.Table/RecordBatch, polars.DataFrame or dict of numpy arrays. Real ids lie in
    [1, N); padding is (0, 0.0). Binary labels become 0/1 (libSVM -1 -> 0); a missing label
    column gives zeros.

    Each field is hashed as one contiguous column (B,) that stays in cache through all its
    passes, then written into its column of the row-major ids.
    """
    df = _as_polars(batch, spec)
    check_schema(df.schema, spec)
    arrow = batch if isinstance(batch, pa.Table) else None  # zero-copy columns for the kernel
    b, width = df.height, spec.num_fields
    remap = spec.remap
    starts = np.cumsum([0] + [f.width for f in spec.fields])[:-1]
    scalar = [(int(c), f) for c, f in zip(starts, spec.fields) if f.kind != "multi"]
    strings = [(c, f) for c, f in scalar if f.hasher == HASH_FUNCTION and f.kind == "categorical"]
    ints = [(c, f) for c, f in scalar if f.hasher != HASH_FUNCTION and f.bucketiser != "quantile"]
    others = [(c, f) for c, f in scalar if f.kind == "numeric" and f.bucketiser == "quantile"]
    ids = np.empty((b, width), np.int64)
    if strings:  # one Polars select: the columns hash in parallel
        out = df.select([xxh3_expr(pl.col(f.name), f.seed).alias(f"_{c}") for c, f in strings])
        h = out.to_numpy(order="fortran")
        for j, (c, f) in enumerate(strings):
            ids[:, c] = _rows(_writable(h[:, j]), f, remap)
    fast = [(c, f, col) for c, f in ints if (col := _int_column(df, arrow, f)) is not None]
    if fast:  # compiled, straight from the Arrow buffers: one pass writes every id
        hash_int_fields(
            [x[2] for x in fast], [x[1] for x in fast], [x[0] for x in fast], remap, ids
        )
        done = {c for c, _, _ in fast}
        ints = [(c, f) for c, f in ints if c not in done]
    if ints:  # one select, column-major: each column is hashed in place
        keys = df.select([_int_keys_expr(f).alias(f"_{c}") for c, f in ints]).to_numpy()
        if not (keys.flags.f_contiguous and keys.flags.writeable):
            keys = np.asfortranarray(keys).copy(order="F")
        for j, (c, f) in enumerate(ints):
            ids[:, c] = _rows(_hash_keys(keys[:, j], f, in_place=True), f, remap)
    for c, f in others:
        ids[:, c] = _rows(field_hashes(df, f), f, remap)
    values = np.ones((b, width), np.float32)
    for c, f in zip(starts, spec.fields):
        if f.kind == "multi":
            block, values[:, c : c + f.width] = _multi(df, f, b)
            if remap is not None:
                block = remap_rows(np.ascontiguousarray(block), remap, f.oov_row)
            ids[:, c : c + f.width] = block
    return {"ids": ids, "values": values, "label": _label(df, spec)}


def _label(df: pl.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """(B,) float32: binary 1.0 where label > 0 (0/1 and -1/+1 alike); regression as given."""
    if spec.label is None or spec.label not in df.columns:
        return np.zeros(df.height, np.float32)
    e = pl.col(spec.label).cast(pl.Float32)
    e = (e > 0).cast(pl.Float32) if spec.task == "binary" else e
    return df.select(e.fill_null(0.0)).to_series().to_numpy().astype(np.float32, copy=False)


def transform_arrow(table: pa.Table, spec: FeatureSpec) -> pa.Table:
    """Like `transform`, as an Arrow table: ids and values fixed-size lists of F, label float32."""
    out = transform(table, spec)
    f = spec.num_fields
    ids = pa.FixedSizeListArray.from_arrays(pa.array(out["ids"].reshape(-1)), f)
    vals = pa.FixedSizeListArray.from_arrays(pa.array(out["values"].reshape(-1)), f)
    return pa.table({"ids": ids, "values": vals, "label": out["label"]})
