"""ravfm-hashed rows -> each peer's input: id arrays, libSVM text, myFM design matrices.

Runs in ravfm's venv. Every writer takes ids (B, F) int64 in [0, N), the row of each field
in one shared table of N rows (ravfm's `transform(...)["ids"]`), and label (B,). The peers then
see the same rows and the same ids as ravfm, so only training differs; `prepare_ctr` times the
conversion apart from training. peer_io.py documents the formats and reads them back.

    python -m bench.peers.prepare --spec SPEC --train SHARDS --test SHARDS --out DIR [--rows R]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "write_id_arrays",
    "write_libsvm",
    "write_myfm_npz",
    "hashed_split",
    "prepare_ctr",
]

_CHUNK = 1 << 17  # rows per libSVM block: ~50 MB of text for Criteo's 39 fields


def _check(ids: np.ndarray, label: np.ndarray, num_rows: int | None) -> int:
    """Validate ids (B, F) and label (B,); return N (num_rows, or ids.max() + 1)."""
    if ids.ndim != 2 or len(ids) != len(label):
        raise ValueError(f"ids must be (B, F) with B = len(label); got {ids.shape}, {len(label)}")
    top = int(ids.max()) if ids.size else -1
    n = top + 1 if num_rows is None else int(num_rows)
    if ids.size and (int(ids.min()) < 0 or top >= n):
        raise ValueError(f"ids must lie in [0, {n}); got [{int(ids.min())}, {top}]")
    return n


def write_id_arrays(
    ids: np.ndarray, label: np.ndarray, path: str | os.PathLike, num_rows: int | None = None
) -> Path:
    """ids (B, F) int, label (B,) -> PATH (.npz) for TorchRec and PyTorch.

    ids are stored as int32 when N fits (half the bytes), label as float32, and N = num_rows
    (default ids.max() + 1) beside them.
    """
    ids = np.asarray(ids)
    n = _check(ids, label, num_rows)
    dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64
    path = Path(path)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(
            f,
            ids=ids.astype(dtype, copy=False),
            label=np.asarray(label, dtype=np.float32),
            num_rows=np.int64(n),
        )
    return path


@numba.njit(cache=True)
def _libsvm_block(ids, lab_bytes, lab_off, out):
    """ids (B, F) int64, label text (bytes + (B+1,) offsets) -> bytes in out; returns the length.

    Each line is `label id:1 id:1 ...\\n`, ids in decimal, fields in order.
    """
    digits = np.empty(20, dtype=np.uint8)
    pos = 0
    for r in range(ids.shape[0]):
        for j in range(lab_off[r], lab_off[r + 1]):
            out[pos] = lab_bytes[j]
            pos += 1
        for f in range(ids.shape[1]):
            out[pos] = 32  # ' '
            pos += 1
            v = ids[r, f]
            n = 0
            while True:
                digits[n] = 48 + v % 10
                v //= 10
                n += 1
                if v == 0:
                    break
            for j in range(n - 1, -1, -1):
                out[pos] = digits[j]
                pos += 1
            out[pos] = 58  # ':'
            out[pos + 1] = 49  # '1'
            pos += 2
        out[pos] = 10  # '\n'
        pos += 1
    return pos


def _label_text(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """label (B,) -> (bytes, (B+1,) int64 offsets); integral labels print as integers (0, 1)."""
    label = np.asarray(label)
    if label.dtype.kind == "f" and np.all(label == np.round(label)):
        label = label.astype(np.int64)
    text = pc.cast(pa.array(label), pa.string())
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32)[: len(label) + 1].astype(np.int64)
    data = text.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return raw, offsets


def write_libsvm(ids: np.ndarray, label: np.ndarray, path: str | os.PathLike) -> Path:
    """ids (B, F) int, label (B,) -> PATH, libSVM text `label id:1 ... id:1` (xLearn's input).

    Compiled (numba) in blocks of _CHUNK rows; ids keep their value (0-based, as ravfm's).
    """
    ids = np.asarray(ids)
    _check(ids, label, None)
    width = len(str(int(ids.max()))) + 3 if ids.size else 4  # ' ' + digits + ':1'
    path = Path(path)
    with open(path, "wb") as f:
        for lo in range(0, len(ids), _CHUNK):
            block = np.ascontiguousarray(ids[lo : lo + _CHUNK], dtype=np.int64)
            lab_bytes, lab_off = _label_text(label[lo : lo + _CHUNK])
            longest = int(np.diff(lab_off).max())
            out = np.empty(len(block) * (block.shape[1] * width + longest + 1), dtype=np.uint8)
            n = _libsvm_block(block, lab_bytes, lab_off, out)
            f.write(memoryview(out[:n]))
    return path


def _coo(ids: np.ndarray, values: np.ndarray | None, fields: np.ndarray) -> tuple[np.ndarray, ...]:
    """ids (B, F), values (B, F) or None, fields (F,) -> row, id, value, field, each (nnz,).

    Entries whose value is 0 (padding) are dropped.
    """
    b, f = ids.shape
    rows = np.repeat(np.arange(b, dtype=np.int64), f)
    cols = ids.reshape(-1).astype(np.int64)
    vals = np.ones(b * f, np.float32) if values is None else values.reshape(-1).astype(np.float32)
    flds = np.tile(np.asarray(fields, dtype=np.int64), b)
    keep = vals != 0
    return rows[keep], cols[keep], vals[keep], flds[keep]


def _csr(rows, cols, vals, num_rows_b: int, num_cols: int) -> dict[str, np.ndarray]:
    """COO triples (duplicates summed) -> canonical CSR parts: sorted columns, one entry each."""
    key, inv = np.unique(rows * num_cols + cols, return_inverse=True)
    data = np.bincount(inv.reshape(-1), weights=vals, minlength=len(key)).astype(np.float32)
    indptr = np.zeros(num_rows_b + 1, dtype=np.int64)
    np.cumsum(np.bincount(key // num_cols, minlength=num_rows_b), out=indptr[1:])
    return {
        "indptr": indptr,
        "indices": (key % num_cols).astype(np.int32),
        "data": data,
        "shape": np.array([num_rows_b, num_cols], dtype=np.int64),
    }


def write_myfm_npz(
    train_ids: np.ndarray,
    train_label: np.ndarray,
    test_ids: np.ndarray,
    test_label: np.ndarray,
    path: str | os.PathLike,
    num_rows: int,
    *,
    train_values: np.ndarray | None = None,
    test_values: np.ndarray | None = None,
    fields: np.ndarray | None = None,
    compact: bool = True,
) -> Path:
    """Train and test rows -> PATH (.npz): one-hot CSR design matrices for myFM.

    ids (B, F) int in [0, N), label (B,); values (B, F) float, default 1 (multi-valued fields
    give 1/n, padding 0, which is dropped). fields (F,) int: the field of each id column
    (ravfm's spec.field_index; default one field per column). Row b of the design matrix holds
    value v at column c for each (id, v) of row b; an id twice in a row sums (the dense one-hot).
    compact keeps only the columns some train or test row uses, ordered by (first field, id),
    so myFM's per-field groups are contiguous (group_shapes = counts of field_of_column); else
    D = N and column c is id c. peer_io.py lists the arrays.
    """
    train_ids, test_ids = np.asarray(train_ids), np.asarray(test_ids)
    _check(train_ids, train_label, num_rows)
    _check(test_ids, test_label, num_rows)
    if train_ids.shape[1] != test_ids.shape[1]:
        raise ValueError(f"train and test ids differ in F: {train_ids.shape} vs {test_ids.shape}")
    f = train_ids.shape[1]
    fields = np.arange(f) if fields is None else np.asarray(fields)
    parts = {
        "train": _coo(train_ids, train_values, fields),
        "test": _coo(test_ids, test_values, fields),
    }
    all_cols = np.concatenate([parts["train"][1], parts["test"][1]])
    all_fields = np.concatenate([parts["train"][3], parts["test"][3]])
    if compact:
        # first field per id: sort by (id, field), keep the first of each id
        order = np.lexsort((all_fields, all_cols))
        first = np.r_[True, all_cols[order][1:] != all_cols[order][:-1]]
        col_ids, col_field = all_cols[order][first], all_fields[order][first]
        by_field = np.lexsort((col_ids, col_field))  # design column order: (field, id)
        columns, field_of_column = col_ids[by_field], col_field[by_field]
        lookup = np.argsort(columns)  # columns sorted by id -> design column
        to_col = lambda c: lookup[np.searchsorted(columns[lookup], c)]  # noqa: E731
    else:
        columns = np.arange(num_rows, dtype=np.int64)
        field_of_column = np.full(num_rows, len(np.unique(fields)), dtype=np.int64)
        np.minimum.at(field_of_column, all_cols, all_fields)
        to_col = lambda c: c  # noqa: E731
    out: dict[str, np.ndarray] = {
        "columns": columns.astype(np.int64),
        "field_of_column": field_of_column.astype(np.int32),
    }
    for s, label, b in (
        ("train", train_label, len(train_ids)),
        ("test", test_label, len(test_ids)),
    ):
        rows, cols, vals, _ = parts[s]
        for k, v in _csr(rows, to_col(cols), vals, b, len(columns)).items():
            out[f"{s}_{k}"] = v
        out[f"{s}_y"] = np.asarray(label, dtype=np.float32)
    path = Path(path)
    with open(path, "wb") as fh:
        np.savez(fh, **out)
    return path


def hashed_split(shards: str, split: str, spec_path: str, rows: int | None = None) -> dict:
    """ravfm shards + feature spec -> {"ids": (B, F) int64, "label": (B,), "num_rows": N}."""
    import pyarrow.parquet as pq

    from ravfm.data.index import split_paths
    from ravfm.features.spec import FeatureSpec
    from ravfm.features.transform import transform

    spec = FeatureSpec.load(spec_path)
    ids, labels, have = [], [], 0
    for p in split_paths(shards, split):
        out = transform(pq.read_table(p), spec)
        ids.append(out["ids"])
        labels.append(out["label"])
        have += len(out["label"])
        if rows is not None and have >= rows:
            break
    ids_all, lab = np.concatenate(ids)[:rows], np.concatenate(labels)[:rows]
    return {"ids": ids_all, "label": lab, "num_rows": spec.num_rows}


def prepare_ctr(train: dict, test: dict, out_dir: str | os.PathLike) -> dict:
    """Hashed train/test (hashed_split's dicts) -> OUT/{train,test}.{npz,libsvm}; seconds each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    for name, d in (("train", train), ("test", test)):
        t = time.perf_counter()
        write_id_arrays(d["ids"], d["label"], out_dir / f"{name}.npz", d["num_rows"])
        seconds[f"{name}_npz_s"] = time.perf_counter() - t
        t = time.perf_counter()
        write_libsvm(d["ids"], d["label"], out_dir / f"{name}.libsvm")
        seconds[f"{name}_libsvm_s"] = time.perf_counter() - t
    return {"dir": str(out_dir), "train_rows": len(train["label"]), **seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="ravfm shards -> the CTR peers' inputs")
    ap.add_argument("--spec", required=True, help="ravfm feature spec directory")
    ap.add_argument("--train", required=True, help="shards holding the train split")
    ap.add_argument("--test", required=True, help="shards holding the test split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=None, help="at most this many train rows")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    train = hashed_split(args.train, "train", args.spec, args.rows)
    test = hashed_split(args.test, "test", args.spec)
    hash_s = time.perf_counter() - t
    print(json.dumps({"hash_s": hash_s, **prepare_ctr(train, test, args.out)}))


if __name__ == "__main__":
    main()
