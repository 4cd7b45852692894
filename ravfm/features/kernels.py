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


@numba.njit(cache=True, nogil=True)
def _build(kept, slots):
    empty = slots[0, 0]  # the table arrives filled with its empty marker
    m = slots.shape[0] - 1
    for j in range(kept.shape[0]):
        i = kept[j] & m
        while slots[i, 0] != empty:
            i = (i + 1) & m
        slots[i, 0] = kept[j]
        slots[i, 1] = j + 1


def build_remap(kept_rows: np.ndarray) -> np.ndarray:
    """An open-addressing table of the kept hashed rows: slots (cap, 2) of (hashed row, compact
    row), empty slots all ones; kept_rows[j] (sorted, unique, >= 1) maps to compact row j + 1.

    The slot of a row is its low bits (hashed rows are hash outputs: uniform), probing
    linearly; at most half full. Key and value share a cache line, and uint32 when the rows fit
    (8 bytes a slot): memory is proportional to the kept rows, not to 2^hash_bits."""
    kept = np.ascontiguousarray(kept_rows, dtype=np.int64)
    cap = 1 << max(4, int(2 * max(len(kept), 1) - 1).bit_length())
    small = not len(kept) or (int(kept[-1]) < 2**32 - 1 and len(kept) < 2**32 - 1)
    dtype = np.uint32 if small else np.uint64
    slots = np.full((cap, 2), np.iinfo(dtype).max, dtype)
    _build(kept.astype(dtype), slots)
    return slots


@numba.njit(inline="always")
def _empty(slots):
    return np.iinfo(slots.dtype).max


@numba.njit(inline="always")
def _remap_block(rows, n, slots, oov, first):
    """rows[:n] (int64 hashed rows, 0 = padding) -> compact rows in place. The first probe of
    every row is loaded in its own loop (independent loads the CPU overlaps), then resolved."""
    m = slots.shape[0] - 1
    empty = np.int64(_empty(slots))
    for b in range(n):
        first[b] = slots[rows[b] & m, 0]
    for b in range(n):
        r = rows[b]
        if r == 0:
            continue
        i = r & m
        k = np.int64(first[b])  # exact: keys are below 2^41, the empty marker wraps alike
        while True:
            if k == r:
                rows[b] = np.int64(slots[i, 1])
                break
            if k == empty:
                rows[b] = oov
                break
            i = (i + 1) & m
            k = np.int64(slots[i, 0])


@numba.njit(cache=True, nogil=True)
def _remap(rows, slots, oov):
    first = np.empty(_BLOCK, slots.dtype)
    for start in range(0, rows.shape[0], _BLOCK):
        n = min(_BLOCK, rows.shape[0] - start)
        _remap_block(rows[start:], n, slots, oov, first)


def remap_rows(rows: np.ndarray, slots: np.ndarray, oov: int) -> np.ndarray:
    """Hashed rows (any shape) int64 -> compact rows, in place: a kept row to its compact row,
    any other (but padding 0) to `oov`. slots: `build_remap`'s table. Returns rows."""
    _remap(rows.reshape(-1), slots, np.int64(oov))
    return rows


@numba.njit(cache=True, nogil=True)
def _hash_block(values, valid, start, stop, bit_off, has_valid, sg, numeric, mask, row_off, oov,
                col, slots, first, keys, thresholds, tmp, ids):  # fmt: skip
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
    if slots.shape[0] > 0:
        _remap_block(tmp, n, slots, oov, first)
    for b in range(n):
        dst[b] = tmp[b]


@numba.njit(cache=True, nogil=True)
def _hash_fields(values, valid, bit_off, has_valid, sg, numeric, mask, row_off, oov, cols,
                 slots, keys, thresholds, ids):  # fmt: skip
    n = ids.shape[0]
    tmp = np.empty(_BLOCK, np.int64)
    first = np.empty(_BLOCK, slots.dtype)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        for j in range(len(values)):
            _hash_block(values[j], valid[j], start, stop, bit_off[j], has_valid[j], sg[j],
                        numeric[j], mask[j], row_off[j], oov[j], cols[j], slots, first, keys,
                        thresholds, tmp, ids)  # fmt: skip


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
    remap: np.ndarray | None,
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
    bad_remap = remap is not None and (
        remap.ndim != 2 or remap.shape[1] != 2 or not len(remap) or len(remap) & (len(remap) - 1)
    )
    if ids.dtype != np.int64 or bad_remap:
        raise ValueError("ids must be int64 and remap a (power of two, 2) table of build_remap")
    by_dtype: dict[np.dtype, list[int]] = {}
    for j, (values, _, _) in enumerate(columns):
        by_dtype.setdefault(values.dtype, []).append(j)
    slots = remap if remap is not None else np.zeros((0, 2), np.uint32)
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
            slots,
            _key_table(),
            _criteo_thresholds(),
            ids,
        )
