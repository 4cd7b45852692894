"""Compiled (numba) hashing of integer columns straight from their Arrow buffers.

`hash_int_fields` is the fast twin of hashing.py's numpy path (mix64, criteo_bucket_hashes)
for every scalar field whose column is a plain integer Arrow array: one pass per row block
reads each column's values and validity bits, applies the field's rule (splitmix64 of the
value, or of its Criteo bucket), masks into the field's buckets, maps the hashed row to its
compact row (or the field's OOV row, for ids folded by min-count) through an open-addressing
table, and writes the row-major ids (B, F) while the block is still in cache. The
numpy path makes about fifteen passes per column and a strided transpose; this makes one.
tests/test_features_kernels.py holds it to the numpy path and to the row-by-row definition.

numba is used because the hashing contract needs 64-bit wrapping integer arithmetic over
every value of every field, fused with the compact-row lookup: numpy can only do that as
separate whole-array passes, and polars-hash has no integer mixer. Compiled code is cached on
disk (cache=True), so a worker process pays the compile once per machine.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import pyarrow as pa

from ravfm.features.hashing import _GAMMA, _HI, _U64, NULL_KEY, _criteo_thresholds, criteo_bucket

__all__ = ["hash_int_fields", "arrow_int_column", "build_remap", "remap_rows", "FAST_INT_TYPES"]

# Arrow types whose values the kernel reads as int64 exactly (UInt64 above 2^63 would not be).
FAST_INT_TYPES = (
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint16(),
    pa.uint32(),
)
_BLOCK = 256  # rows per block: ids (256 x F int64) stays in L2 while every column is written
_NULL = np.int64(NULL_KEY)
_NO_BITMAP = np.frombuffer(b"", dtype=np.uint8)  # read-only like every Arrow view: one type
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@functools.lru_cache(maxsize=1)
def _key_table() -> np.ndarray:
    """int64 (_HI,): the Criteo key of each value 0 .. _HI - 1 (values <= 2 are their own)."""
    return criteo_bucket(np.arange(_HI, dtype=np.int64))


@numba.njit(inline="always")
def _splitmix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _criteo_key(x, keys, thresholds):
    """The Criteo key of int64 x; branch-free for x < _HI (keys[x] = x for 0 <= x <= 2)."""
    if x >= keys.shape[0]:  # rare: the exact rule through the integer thresholds
        return np.int64(np.searchsorted(thresholds, x, side="right"))
    k = keys[np.uint64(max(x, 0))]
    return x if x < 0 else k


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(inline="always")
def _slot(key, shift):
    return (np.uint64(key) * _GOLDEN) >> shift


@numba.njit(inline="always")
def _lookup(key, slot_keys, slot_vals, shift, oov):
    """The compact row of hashed row `key`, or `oov` when it was not kept (open addressing)."""
    m = slot_keys.shape[0] - 1
    i = _slot(key, shift)
    while True:
        k = slot_keys[i]
        if k == key:
            return slot_vals[i]
        if k < 0:
            return oov
        i = (i + np.uint64(1)) & np.uint64(m)


@numba.njit(cache=True, nogil=True)
def _build(kept, slot_keys, slot_vals, shift):
    m = slot_keys.shape[0] - 1
    for j in range(kept.shape[0]):
        i = _slot(kept[j], shift)
        while slot_keys[i] >= 0:
            i = (i + np.uint64(1)) & np.uint64(m)
        slot_keys[i] = kept[j]
        slot_vals[i] = j + 1


def build_remap(kept_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An open-addressing table of the kept hashed rows: (slot_keys, slot_vals) int64, empty
    slots -1; kept_rows[j] (sorted, unique, >= 1) maps to compact row j + 1. At most half full,
    so a lookup probes about 1.5 slots; memory is proportional to the kept rows, not 2^bits."""
    kept = np.ascontiguousarray(kept_rows, dtype=np.int64)
    cap = 1 << max(4, int(2 * max(len(kept), 1) - 1).bit_length())
    slot_keys = np.full(cap, -1, np.int64)
    slot_vals = np.zeros(cap, np.int64)
    _build(kept, slot_keys, slot_vals, _shift(cap))
    return slot_keys, slot_vals


def _shift(cap: int) -> np.uint64:
    return np.uint64(64 - (cap.bit_length() - 1))


@numba.njit(cache=True, nogil=True)
def _remap(rows, slot_keys, slot_vals, shift, oov):
    for i in range(rows.shape[0]):
        r = rows[i]
        if r != 0:  # padding stays padding
            rows[i] = _lookup(r, slot_keys, slot_vals, shift, oov)


def remap_rows(rows: np.ndarray, remap: tuple[np.ndarray, np.ndarray], oov: int) -> np.ndarray:
    """Hashed rows (n,) int64 -> compact rows, in place: kept rows to their compact row, others
    (but padding 0) to `oov`. Returns rows."""
    flat = rows.reshape(-1)
    _remap(flat, remap[0], remap[1], _shift(len(remap[0])), np.int64(oov))
    return rows


@numba.njit(cache=True, nogil=True)
def _hash_block(values, valid, start, stop, bit_off, has_valid, sg, numeric, mask, row_off, oov,
                col, slot_keys, slot_vals, shift, keys, thresholds, tmp, ids):  # fmt: skip
    """ids[start:stop, col] of one field, through tmp (>= stop - start,) int64 in L1.

    Each step is its own tight loop (no invariant branch inside): read, nulls, Criteo keys,
    splitmix64 + mask + offset, compact remap with min-count fold, strided write.
    """
    n = stop - start
    src, dst = values[start:stop], ids[start:stop, col]  # views: loops from 0 prove i >= 0
    for b in range(n):
        tmp[b] = np.int64(src[b])
    if has_valid:
        for b in range(n):  # branch-free: nulls are frequent and random
            i = np.uint64(bit_off + start + b)  # unsigned index: no negative-index check
            keep = -np.int64((valid[i >> np.uint64(3)] >> (i & np.uint64(7))) & np.uint64(1))
            tmp[b] = (tmp[b] & keep) | (_NULL & ~keep)
    if numeric:
        for b in range(n):
            tmp[b] = _criteo_key(tmp[b], keys, thresholds)
    for b in range(n):
        tmp[b] = np.int64(_splitmix64(np.uint64(tmp[b]) + sg) & mask) + row_off
    if slot_keys.shape[0] > 0:
        for b in range(n):
            tmp[b] = _lookup(tmp[b], slot_keys, slot_vals, shift, oov)
    for b in range(n):
        dst[b] = tmp[b]


@numba.njit(cache=True, nogil=True)
def _hash_fields(values, valid, bit_off, has_valid, sg, numeric, mask, row_off, oov, cols,
                 slot_keys, slot_vals, shift, keys, thresholds, ids):  # fmt: skip
    n = ids.shape[0]
    tmp = np.empty(_BLOCK, np.int64)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        for j in range(len(values)):
            _hash_block(values[j], valid[j], start, stop, bit_off[j], has_valid[j], sg[j],
                        numeric[j], mask[j], row_off[j], oov[j], cols[j], slot_keys, slot_vals,
                        shift, keys, thresholds, tmp, ids)  # fmt: skip


def arrow_int_column(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(values (B,), validity bitmap bytes, bit offset) of an integer Arrow column, zero-copy.

    None when the kernel cannot read it (another type, or several chunks). A column with no
    nulls gives an empty bitmap.
    """
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks != 1:
            return None
        arr = arr.chunk(0)
    if arr.type not in FAST_INT_TYPES:
        return None
    vbuf, dbuf = arr.buffers()[:2]
    dtype = arr.type.to_pandas_dtype()
    values = _read_only(np.frombuffer(dbuf, dtype=dtype, count=arr.offset + len(arr)))
    values = values[arr.offset :]
    if arr.null_count == 0 or vbuf is None:
        return values, _NO_BITMAP, 0
    return values, _read_only(np.frombuffer(vbuf, dtype=np.uint8)), arr.offset


def _read_only(a: np.ndarray) -> np.ndarray:
    """a, flagged read-only: Arrow hands out both kinds, and the kernel's tuples need one."""
    a.flags.writeable = False
    return a


def hash_int_fields(
    columns: list[tuple[np.ndarray, np.ndarray, int]],
    fields: list,
    cols: list[int],
    remap: tuple[np.ndarray, np.ndarray] | None,
    ids: np.ndarray,
) -> None:
    """Write the table rows of integer scalar fields into ids (B, F) int64, in place.

    columns: per field, what `arrow_int_column` gave; fields: their FieldSpecs (categorical,
    or numeric with the Criteo "log2" rule); cols: their column in ids; remap: the spec's
    compact-row table (`build_remap`), or None when rows are not compacted. Equal to
    `transform`'s numpy path, value for value.
    """
    n, width = ids.shape
    for (values, valid, bit_off), c in zip(columns, cols):  # the kernel does no bounds checks
        if len(values) != n or not 0 <= c < width or (len(valid) and len(valid) * 8 < bit_off + n):
            raise ValueError(f"column of {len(values)} rows for ids {ids.shape} at column {c}")
    if ids.dtype != np.int64 or (
        remap is not None
        and (len(remap[0]) != len(remap[1]) or len(remap[0]) & (len(remap[0]) - 1))
    ):
        raise ValueError("ids must be int64 and remap a power-of-two table of keys and values")
    by_dtype: dict[np.dtype, list[int]] = {}
    for j, (values, _, _) in enumerate(columns):
        by_dtype.setdefault(values.dtype, []).append(j)
    empty = np.zeros(0, np.int64)
    slot_keys, slot_vals = remap if remap is not None else (empty, empty)
    shift = _shift(len(slot_keys)) if len(slot_keys) else np.uint64(0)
    for group in by_dtype.values():  # one compiled call per column dtype (a homogeneous tuple)
        fs = [fields[j] for j in group]
        _hash_fields(
            tuple(columns[j][0] for j in group),
            tuple(columns[j][1] for j in group),
            np.array([columns[j][2] for j in group], np.int64),
            np.array([len(columns[j][1]) > 0 for j in group], np.bool_),
            np.array([(f.seed + _GAMMA) & _U64 for f in fs], np.uint64),
            np.array([f.kind == "numeric" for f in fs], np.bool_),
            np.array([f.buckets - 1 for f in fs], np.uint64),
            np.array([f.offset for f in fs], np.int64),
            np.array([f.oov_row for f in fs], np.int64),
            np.array([cols[j] for j in group], np.int64),
            slot_keys,
            slot_vals,
            shift,
            _key_table(),
            _criteo_thresholds(),
            ids,
        )
