"""The compiled integer hashing kernel against the numpy path and the scalar definition."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from ravfm.config import FeatureConfig
from ravfm.data.schemas import CRITEO
from ravfm.features import transform as T
from ravfm.features.hashing import NULL_KEY, criteo_bucket_hashes, mix64
from ravfm.features.kernels import (
    FAST_INT_TYPES,
    arrow_int_column,
    build_remap,
    hash_int_fields,
    remap_rows,
)
from ravfm.features.spec import build_spec


def _spec(hash_bits: int = 12):
    return build_spec(
        {"dataset": "criteo", "schema": CRITEO.columns, "label": "label"},
        FeatureConfig(hash_bits=hash_bits),
    )


def _numpy_rows(x: np.ndarray, null: np.ndarray, f, kept) -> np.ndarray:
    """The numpy path, step by step: key (null -> NULL_KEY), hash, mask, offset, then with
    kept (sorted hashed rows) the compact row 1 + its position, or the field's OOV row."""
    keys = np.where(null, NULL_KEY, x.astype(np.int64))
    h = criteo_bucket_hashes(keys, f.seed) if f.kind == "numeric" else mix64(keys, f.seed)
    rows = (h & np.uint64(f.buckets - 1)).astype(np.int64) + f.offset
    if kept is None:
        return rows
    return np.where(np.isin(rows, kept), 1 + np.searchsorted(kept, rows), f.oov_row)


def _values(rng: np.random.Generator, t: pa.DataType, n: int) -> np.ndarray:
    info = np.iinfo(t.to_pandas_dtype())
    x = rng.integers(info.min, info.max, n, dtype=np.int64, endpoint=True)
    small = rng.random(n) < 0.6  # mostly small values, as Criteo's counts are
    x[small] = rng.integers(max(info.min, -5), min(info.max, 70_000), small.sum())
    return x


@pytest.mark.parametrize("arrow_type", FAST_INT_TYPES, ids=str)
@pytest.mark.parametrize("null_rate", [0.0, 0.3])
def test_kernel_equals_numpy_path_for_every_integer_type(arrow_type, null_rate):
    rng = np.random.default_rng(7)
    spec = _spec()
    numeric = next(f for f in spec.fields if f.kind == "numeric")
    cat = next(f for f in spec.fields if f.kind == "categorical")
    n = 3000  # not a multiple of the kernel's row block
    x = _values(rng, arrow_type, n)
    null = rng.random(n) < null_rate
    arr = pa.array(np.where(null, 0, x), type=arrow_type, mask=null)
    for f in (numeric, cat):
        ids = np.full((n, 3), -1, np.int64)
        hash_int_fields([arrow_int_column(arr)], [f], [1], None, ids)
        np.testing.assert_array_equal(ids[:, 1], _numpy_rows(x, null, f, None))
        assert (ids[:, [0, 2]] == -1).all()  # other columns untouched


def test_kernel_reads_sliced_arrays_at_any_bit_offset():
    rng = np.random.default_rng(1)
    f = next(f for f in _spec().fields if f.kind == "categorical")
    x = rng.integers(0, 2**32, 1000, dtype=np.int64)
    null = rng.random(1000) < 0.4
    arr = pa.array(np.where(null, 0, x), type=pa.uint32(), mask=null)
    for start in (0, 1, 3, 8, 13, 255):
        sl = arr.slice(start, 600)
        ids = np.empty((600, 1), np.int64)
        hash_int_fields([arrow_int_column(sl)], [f], [0], None, ids)
        want = _numpy_rows(x[start : start + 600], null[start : start + 600], f, None)
        np.testing.assert_array_equal(ids[:, 0], want)


def test_kernel_criteo_rule_off_the_fast_table_and_at_the_extremes():
    f = next(f for f in _spec().fields if f.kind == "numeric")
    x = np.array([-(2**63) + 1, -1025, -1, 0, 1, 2, 3, 65535, 65536, 10**12, 2**63 - 1], np.int64)
    ids = np.empty((len(x), 1), np.int64)
    hash_int_fields([arrow_int_column(pa.array(x))], [f], [0], None, ids)
    np.testing.assert_array_equal(ids[:, 0], _numpy_rows(x, np.zeros(len(x), bool), f, None))


def test_kernel_folds_min_count_ids_into_the_oov_row():
    spec = _spec(hash_bits=8)
    f = next(f for f in spec.fields if f.kind == "categorical")
    rng = np.random.default_rng(3)
    kept = np.flatnonzero(rng.random(spec.num_rows) < 0.5)
    x = rng.integers(0, 5000, 2000)
    ids = np.empty((2000, 1), np.int64)
    hash_int_fields([arrow_int_column(pa.array(x, pa.int32()))], [f], [0], build_remap(kept), ids)
    want = _numpy_rows(x, np.zeros(2000, bool), f, kept)
    np.testing.assert_array_equal(ids[:, 0], want)
    assert (ids[:, 0] == f.oov_row).any() and (ids[:, 0] != f.oov_row).any()


def test_columns_the_kernel_cannot_read_are_refused():
    assert arrow_int_column(pa.array([1.5, 2.0])) is None
    assert arrow_int_column(pa.array([2**63 + 5], pa.uint64())) is None
    assert arrow_int_column(pa.array(["a"])) is None
    assert arrow_int_column(pa.chunked_array([[1, 2], [3]])) is None


def test_transform_is_the_same_with_and_without_the_kernel(monkeypatch):
    from bench.hash_throughput import criteo_like

    spec = _spec(hash_bits=10)
    rng = np.random.default_rng(5)
    spec = dataclasses.replace(spec, kept_rows=np.flatnonzero(rng.random(spec.num_rows) < 0.7))
    data = criteo_like(5000, seed=4)
    fast = T.transform(data, spec)
    chunked = T.transform(pa.concat_tables([data.slice(0, 2500), data.slice(2500)]), spec)
    from_polars = T.transform(pl.from_arrow(data), spec)
    monkeypatch.setattr(T, "_int_column", lambda *a: None)
    slow = T.transform(data, spec)
    assert (fast["ids"] == spec.fields[0].oov_row).any()  # folding happened
    for out in (fast, chunked, from_polars):
        np.testing.assert_array_equal(out["ids"], slow["ids"])
        np.testing.assert_array_equal(out["values"], slow["values"])
        np.testing.assert_array_equal(out["label"], slow["label"])


def test_kernel_takes_writable_and_read_only_buffers_together():
    f = next(f for f in _spec().fields if f.kind == "categorical")
    x = np.arange(100, dtype=np.int64)
    null = x % 3 == 0
    read_only = pa.array(np.where(null, 0, x), mask=null)
    writable = pa.Array.from_buffers(  # buffers Arrow allocated as mutable
        pa.int64(), 100, [pa.py_buffer(bytearray(b.to_pybytes())) for b in read_only.buffers()]
    )
    ids = np.empty((100, 2), np.int64)
    cols = [arrow_int_column(read_only), arrow_int_column(writable)]
    hash_int_fields(cols, [f, f], [0, 1], None, ids)
    np.testing.assert_array_equal(ids[:, 0], _numpy_rows(x, null, f, None))
    np.testing.assert_array_equal(ids[:, 1], ids[:, 0])


def test_kernel_refuses_shapes_it_would_overrun():
    f = next(f for f in _spec().fields if f.kind == "categorical")
    col = arrow_int_column(pa.array(np.arange(10)))
    with pytest.raises(ValueError):
        hash_int_fields([col], [f], [0], None, np.empty((11, 1), np.int64))
    with pytest.raises(ValueError):
        hash_int_fields([col], [f], [1], None, np.empty((10, 1), np.int64))
    with pytest.raises(ValueError):
        hash_int_fields([col], [f], [0], np.ones((3, 2), np.uint32), np.empty((10, 1), np.int64))


def test_remap_table_equals_a_dictionary_for_any_fill():
    """The open-addressing lookup against a plain dict: every kept row to 1 + its position, any
    other row to the OOV row, padding to itself, at table loads up to one half."""
    rng = np.random.default_rng(11)
    for n in (0, 1, 7, 8, 1000, 50_000):
        kept = np.unique(rng.integers(1, 1 << (40 if n % 2 else 31), n))  # uint64 and uint32 slots
        table = build_remap(kept)
        assert len(table) >= 2 * len(kept) and len(table) & (len(table) - 1) == 0
        probe = np.concatenate([kept, rng.integers(1, 1 << 40, 2000), [0, 0], kept[:3] + 1])
        want = {int(r): j + 1 for j, r in enumerate(kept)}
        got = remap_rows(probe.copy(), table, oov=-7)
        assert got.tolist() == [want.get(int(r), -7) if r else 0 for r in probe]
