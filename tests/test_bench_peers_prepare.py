"""bench/peers/prepare.py: each peer's input reads back as the same ids and labels."""

from __future__ import annotations

import numpy as np
import pytest

from bench.peers.peer_io import read_ids_npz, read_libsvm, read_myfm_npz
from bench.peers.prepare import _CHUNK, write_id_arrays, write_libsvm, write_myfm_npz


def _rows(b: int, f: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n, size=(b, f), dtype=np.int64)
    ids[0] = 0  # id 0 and the largest id print right
    ids[1] = n - 1
    return ids, (rng.random(b) < 0.3).astype(np.float32)


def _dense_one_hot(ids, values, columns) -> np.ndarray:
    """The definition, one loop: row b, column of id i gets += value."""
    col_of = {int(c): j for j, c in enumerate(columns)}
    x = np.zeros((len(ids), len(columns)), dtype=np.float32)
    for b in range(len(ids)):
        for f in range(ids.shape[1]):
            v = 1.0 if values is None else values[b, f]
            if v != 0:
                x[b, col_of[int(ids[b, f])]] += v
    return x


def _csr_dense(z: dict, split: str) -> np.ndarray:
    b, d = z[f"{split}_shape"]
    x = np.zeros((b, d), dtype=np.float32)
    ptr = z[f"{split}_indptr"]
    for r in range(b):
        cols = z[f"{split}_indices"][ptr[r] : ptr[r + 1]]
        assert np.all(np.diff(cols) > 0), "CSR columns sorted, one entry each"
        x[r, cols] = z[f"{split}_data"][ptr[r] : ptr[r + 1]]
    return x


def test_libsvm_round_trips_ids_and_labels(tmp_path):
    ids, label = _rows(500, 39, 4_194_344)
    path = write_libsvm(ids, label, tmp_path / "t.libsvm")
    back_ids, back_label = read_libsvm(path)
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_label, label)
    first = path.read_text().splitlines()[0]
    assert first == " ".join([str(int(label[0]))] + ["0:1"] * 39)


def test_libsvm_spans_blocks_and_keeps_fractional_labels(tmp_path):
    ids, _ = _rows(_CHUNK + 7, 3, 100)
    label = np.linspace(0.0, 5.0, len(ids)).astype(np.float32)
    back_ids, back_label = read_libsvm(write_libsvm(ids, label, tmp_path / "t.libsvm"))
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_label, label)


def test_id_arrays_round_trip_as_int32_with_num_rows(tmp_path):
    ids, label = _rows(300, 39, 1000)
    ids_back, label_back, n = read_ids_npz(write_id_arrays(ids, label, tmp_path / "a", 5000))
    assert ids_back.dtype == np.int32 and n == 5000
    np.testing.assert_array_equal(ids_back, ids)
    np.testing.assert_array_equal(label_back, label)
    assert read_ids_npz(write_id_arrays(ids, label, tmp_path / "b.npz"))[2] == ids.max() + 1


def test_id_arrays_refuse_ids_outside_the_table(tmp_path):
    ids, label = _rows(10, 3, 100)
    with pytest.raises(ValueError, match="lie in"):
        write_id_arrays(ids, label, tmp_path / "a.npz", num_rows=50)


@pytest.mark.parametrize("compact", [True, False])
def test_myfm_csr_matches_dense_one_hot(tmp_path, compact):
    train_ids, train_y = _rows(60, 4, 40, seed=1)
    test_ids, test_y = _rows(20, 4, 40, seed=2)
    train_ids[5, 1] = train_ids[5, 0]  # the same id twice in a row sums to 2
    z = read_myfm_npz(
        write_myfm_npz(
            train_ids, train_y, test_ids, test_y, tmp_path / "m.npz", 40, compact=compact
        )
    )
    cols = z["columns"]
    np.testing.assert_array_equal(_csr_dense(z, "train"), _dense_one_hot(train_ids, None, cols))
    np.testing.assert_array_equal(_csr_dense(z, "test"), _dense_one_hot(test_ids, None, cols))
    np.testing.assert_array_equal(z["train_y"], train_y)
    if compact:
        assert set(cols) == set(train_ids.ravel()) | set(test_ids.ravel())
    else:
        np.testing.assert_array_equal(cols, np.arange(40))


def test_myfm_values_drop_padding_and_groups_are_contiguous(tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 30, size=(50, 5))
    values = np.where(rng.random((50, 5)) < 0.3, 0.0, 0.5).astype(np.float32)
    fields = np.array([0, 1, 1, 1, 2])  # a 3-wide multi-valued field in the middle
    path = write_myfm_npz(
        ids, np.zeros(50), ids[:10], np.zeros(10), tmp_path / "m.npz", 30,
        train_values=values, test_values=values[:10], fields=fields,
    )  # fmt: skip
    z = read_myfm_npz(path)
    np.testing.assert_array_equal(_csr_dense(z, "train"), _dense_one_hot(ids, values, z["columns"]))
    assert np.all(np.diff(z["field_of_column"]) >= 0)
    for c, f in zip(z["columns"], z["field_of_column"]):  # first field each id appears in
        assert f == min(
            fields[j] for j in range(5) if np.any((ids[:, j] == c) & (values[:, j] != 0))
        )
