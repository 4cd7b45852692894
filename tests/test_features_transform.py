"""transform against a row-by-row slow twin that states the hashing contract literally."""

from __future__ import annotations

import bisect
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from ravfm.config import FeatureConfig
from ravfm.errors import UserError
from ravfm.features.hashing import field_seed, null_hash, xxh3_strings
from ravfm.features.spec import FeatureSpec, FieldSpec, build_spec
from ravfm.features.transform import check_schema, transform, transform_arrow

M64 = (1 << 64) - 1


def py_mix64(x: int, seed: int) -> int:
    z = (x + seed + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _hash(f: FieldSpec, v) -> int:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return null_hash(f.seed)
    if f.kind == "numeric" and f.bucketiser == "quantile":
        return py_mix64(bisect.bisect_right(list(f.edges), v), f.seed)
    if f.kind == "numeric":
        x = math.floor(v)
        return py_mix64(x if x <= 2 else int(math.log(x) ** 2), f.seed)
    if isinstance(v, str):
        return int(xxh3_strings([v], f.seed)[0])
    return py_mix64(int(v), f.seed)


def slow_transform(rows: list[dict], spec: FeatureSpec) -> tuple[list, list]:
    """The definition, one value at a time."""
    kept = None if spec.kept_rows is None else sorted(spec.kept_rows.tolist())
    compact = None if kept is None else {r: j + 1 for j, r in enumerate(kept)}

    def row_id(f, v):
        r = f.offset + (_hash(f, v) & (f.buckets - 1))  # the hashed row
        return r if compact is None else compact.get(r, f.oov_row)

    all_ids, all_vals = [], []
    for row in rows:
        ids, vals = [], []
        for f in spec.fields:
            v = row[f.name]
            if f.kind != "multi":
                ids.append(row_id(f, v))
                vals.append(1.0)
                continue
            items = [None] if v is None else list(v)[: f.width]
            given = row[f.value_column] if f.value_column else None
            for j in range(f.width):
                if j < len(items):
                    ids.append(row_id(f, items[j]))
                    vals.append(1.0 / len(items) if given is None else float(given[j]))
                else:
                    ids.append(0)
                    vals.append(0.0)
        all_ids.append(ids)
        all_vals.append(vals)
    return all_ids, all_vals


SCHEMA = {"label": "Int8", "C1": "String", "x": "Int64", "I1": "Int64", "tags": "List(String)"}


def _frame(n: int = 300, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    words = ["a", "b", "", "zz", "hello", "\u00e9t\u00e9"]
    c1 = [None if rng.random() < 0.2 else words[rng.integers(len(words))] for _ in range(n)]
    x = [None if rng.random() < 0.2 else int(rng.integers(-50, 50)) for _ in range(n)]
    i1 = [
        None if rng.random() < 0.2 else int(v)
        for v in rng.choice([-3, -1, 0, 1, 2, 3, 7, 10, 1000, 70000, 10**12, -5000], n)
    ]
    tags = []
    for _ in range(n):
        u = rng.random()
        if u < 0.1:
            tags.append(None)
        elif u < 0.2:
            tags.append([])
        else:
            k = int(rng.integers(1, 7))  # up to 6 items: some exceed width 4
            tags.append(
                [None if rng.random() < 0.1 else words[rng.integers(len(words))] for _ in range(k)]
            )
    label = [int(v) for v in rng.integers(0, 2, n)]
    return pl.DataFrame(
        {"label": label, "C1": c1, "x": x, "I1": i1, "tags": tags},
        schema={
            "label": pl.Int8,
            "C1": pl.String,
            "x": pl.Int64,
            "I1": pl.Int64,
            "tags": pl.List(pl.String),
        },
    )


def _spec(**cfg) -> FeatureSpec:
    index = {"dataset": "criteo", "schema": SCHEMA, "label": "label"}
    kw = {k: cfg.pop(k) for k in ("widths", "edges", "kept_rows") if k in cfg}
    return build_spec(
        index,
        FeatureConfig(fields=("C1", "x", "I1", "tags"), **cfg),
        widths=kw.get("widths", {"tags": 4}),
        edges=kw.get("edges"),
        kept_rows=kw.get("kept_rows"),
    )


@pytest.mark.parametrize("id_space, bits", [("shared", 10), ("per_field", 12), ("shared", 20)])
def test_transform_matches_slow_twin(id_space, bits):
    df = _frame()
    spec = _spec(hash_bits=bits, id_space=id_space)
    out = transform(df, spec)
    ids, vals = slow_transform(df.to_dicts(), spec)
    assert out["ids"].dtype == np.int64 and out["values"].dtype == np.float32
    assert out["ids"].shape == (df.height, 1 + 1 + 1 + 4) == out["values"].shape
    assert out["ids"].tolist() == ids
    np.testing.assert_allclose(out["values"], np.array(vals, np.float32), rtol=1e-6)
    assert out["label"].tolist() == [float(v) for v in df["label"]]


def test_quantile_bucketiser_matches_slow_twin():
    df = _frame(200, seed=1).with_columns(pl.col("I1").cast(pl.Float64))
    schema = {**SCHEMA, "I1": "Float64"}
    spec = build_spec(
        {"dataset": "criteo", "schema": schema, "label": "label"},
        FeatureConfig(fields=("I1", "C1"), numeric="quantile"),
        edges={"I1": (-1.0, 0.5, 3.0, 1000.0)},
    )
    assert transform(df, spec)["ids"].tolist() == slow_transform(df.to_dicts(), spec)[0]


def test_min_count_folding_sends_unkept_rows_to_field_oov():
    df = _frame()
    base = _spec(hash_bits=12)
    raw = transform(df, base)["ids"]
    used = np.unique(raw[raw > 0])
    kept = used[::3]  # keep a third of the rows that occur
    spec = _spec(hash_bits=12, kept_rows=kept)
    out = transform(df, spec)["ids"]
    assert out.tolist() == slow_transform(df.to_dicts(), spec)[0]
    oov = np.array([f.oov_row for f in spec.fields for _ in range(f.width)])
    assert (oov >= 1 + len(kept)).all() and spec.num_rows == 1 + len(kept) + len(spec.fields)
    folded = (raw > 0) & ~np.isin(raw, kept)
    assert folded.any() and (out[folded] == np.broadcast_to(oov, out.shape)[folded]).all()
    stay = (raw > 0) & ~folded
    assert (out[stay] == 1 + np.searchsorted(kept, raw[stay])).all()  # kept: its compact row
    assert (out[raw == 0] == 0).all()  # padding untouched


def test_padding_is_id_zero_value_zero_and_real_ids_in_range():
    df = _frame()
    spec = _spec(hash_bits=10)
    out = transform(df, spec)
    ids, vals = out["ids"], out["values"]
    assert ((ids == 0) == (vals == 0.0)).all()
    assert ids.min() >= 0 and ids.max() < spec.num_rows
    assert (ids[:, :3] > 0).all()  # scalar fields are never padding
    tags = ids[:, 3:]
    n_items = df["tags"].list.len().fill_null(1).clip(0, 4).to_numpy()
    assert ((tags > 0).sum(axis=1) == n_items).all()
    np.testing.assert_allclose(vals[:, 3:].sum(axis=1), (n_items > 0).astype(np.float32), rtol=1e-6)


def test_per_field_blocks_are_disjoint():
    spec = _spec(hash_bits=12, id_space="per_field")
    out = transform(_frame(), spec)["ids"]
    col = 0
    for f in spec.fields:
        block = out[:, col : col + f.width]
        real = block[block > 0]
        assert ((real >= f.offset) & (real < f.offset + f.buckets)).all()
        col += f.width
    ends = [(f.offset, f.offset + f.buckets) for f in spec.fields]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:]))
    assert spec.num_rows <= (1 << 12) + 1 + len(spec.fields)


def test_libsvm_values_and_minus_one_labels():
    idx = [[3, 10, 7], [5], None, [1, 2, 3, 4, 5, 6]]
    val = [[1.0, 0.5, 2.0], [1.0], None, [1.0] * 6]
    df = pl.DataFrame(
        {"label": [-1.0, 1.0, 1.0, -1.0], "idx": idx, "val": val},
        schema={"label": pl.Float32, "idx": pl.List(pl.Int64), "val": pl.List(pl.Float32)},
    )
    schema = {"label": "Float32", "idx": "List(Int64)", "val": "List(Float32)"}
    spec = build_spec(
        {"dataset": "libsvm", "schema": schema, "label": "label"},
        FeatureConfig(hash_bits=16),
        widths={"idx": 4},
    )
    out = transform(df, spec)
    ids, vals = slow_transform(df.to_dicts(), spec)
    assert out["ids"].tolist() == ids
    assert out["values"].tolist() == vals
    assert out["values"][0].tolist() == [1.0, 0.5, 2.0, 0.0]
    assert out["label"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert spec.field_index == [0, 0, 0, 0]


def test_input_types_agree_arrow_polars_numpy_dict():
    df = _frame(50)
    spec = _spec(hash_bits=14)
    want = transform(df, spec)
    table = df.to_arrow()
    numpy_batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    for batch in (table, table.to_batches()[0], numpy_batch):
        got = transform(batch, spec)
        for k in ("ids", "values", "label"):
            np.testing.assert_array_equal(got[k], want[k])
    arrow = transform_arrow(table, spec)
    assert arrow.num_rows == 50 and arrow.schema.field("ids").type == pa.list_(pa.int64(), 7)
    assert np.array(arrow["ids"].to_pylist()).tolist() == want["ids"].tolist()


def test_missing_label_gives_zeros_and_regression_keeps_values():
    df = _frame(20).drop("label")
    assert transform(df, _spec()).get("label").tolist() == [0.0] * 20
    schema = {"rating": "Float32", "user_id": "Int64", "item_id": "Int64"}
    spec = build_spec(
        {"dataset": "movielens", "schema": schema, "label": "rating"}, FeatureConfig()
    )
    r = pl.DataFrame(
        {"rating": [4.5, None, 1.0], "user_id": [1, 2, 3], "item_id": [7, 8, 9]},
        schema={"rating": pl.Float32, "user_id": pl.Int64, "item_id": pl.Int64},
    )
    assert spec.task == "regression" and transform(r, spec)["label"].tolist() == [4.5, 0.0, 1.0]


def test_check_schema_names_the_missing_column_and_wrong_type():
    spec = _spec()
    with pytest.raises(UserError, match=r"^the data has no column 'x', which the feature spec"):
        transform(_frame(5).drop("x"), spec)
    bad = {**SCHEMA, "C1": "Int64"}
    with pytest.raises(UserError, match=r"column 'C1' is Int64 but the feature spec hashes it as"):
        check_schema(bad, spec)
    check_schema(
        pa.schema(
            [(k, pa.string()) for k in ("C1",)]
            + [("x", pa.int64()), ("I1", pa.int32()), ("tags", pa.large_list(pa.large_string()))]
        ),
        spec,
    )


def test_field_seeds_differ_so_equal_values_in_two_fields_get_two_rows():
    schema = {"label": "Int8", "C1": "String", "C2": "String"}
    spec = build_spec({"dataset": "criteo", "schema": schema, "label": "label"}, FeatureConfig())
    df = pl.DataFrame(
        {"label": [0], "C1": ["same"], "C2": ["same"]},
        schema={"label": pl.Int8, "C1": pl.String, "C2": pl.String},
    )
    ids = transform(df, spec)["ids"][0]
    assert ids[0] != ids[1] and field_seed("C1", 0) != field_seed("C2", 0)
