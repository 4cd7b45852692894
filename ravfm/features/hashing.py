"""Version-stable hashing and numeric binning: raw values -> 64-bit hashes -> table rows.

The exact map (the contract `feature_spec.json` names and a golden test pins):

- string value s of field f:  h = xxh3_64(utf8(s), seed=seed_f)        (polars-hash, Rust xxhash)
- integer value x of field f: h = mix64(x, seed_f)                      (splitmix64, below)
- null, in any field:         h = mix64(NULL_KEY, seed_f)               (its own id per field)
- numeric field, rule "log2" (the Criteo rule of the libffm winners): key = x if x <= 2 else
  floor(ln(x)^2), computed exactly through integer thresholds; floats are floored first;
  h = mix64(key, seed_f). Rule "quantile": key = #(edges <= x); h = mix64(key, seed_f).
- row = offset_f + (h & (buckets_f - 1)) with buckets_f a power of two and offset_f >= 1, so
  row 0 stays the padding row.

mix64(x, seed) is splitmix64's output function applied to the state x + seed + 0x9E37...7C15
(mod 2^64, x read as its two's-complement uint64). Everything here is numpy integer
arithmetic with fixed constants, so it cannot drift with a library upgrade; `pl.Expr.hash`
is never used because its output may change between Polars versions.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import polars as pl
import polars_hash as plh

__all__ = [
    "HASH_FUNCTION",
    "INT_HASH",
    "NULL_KEY",
    "mix64",
    "null_hash",
    "xxh3_expr",
    "xxh3_strings",
    "field_seed",
    "criteo_bucket",
    "criteo_bucket_hashes",
    "quantile_bucket",
]

HASH_FUNCTION = "xxh3_64"  # polars-hash, strings
INT_HASH = "splitmix64"  # mix64 below, integers and numeric buckets
NULL_KEY = -(2**63)  # the integer key that null stands for (int64 minimum)

_U64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(x: np.ndarray, seed: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """splitmix64(x + seed): int64 or uint64 array (N,) -> uint64 array (N,).

    A new array, or `out` (uint64 or int64, viewed as uint64; may be x itself) when given:
    the in-place form keeps a column in cache through all nine passes.
    """
    if out is None:
        kind = np.asarray(x).dtype.kind
        out = np.array(x, dtype=np.int64 if kind == "i" else np.uint64, copy=True)
    elif out is not x:
        np.copyto(out, x, casting="unsafe")
    z = out.view(np.uint64)
    z += np.uint64((seed + _GAMMA) & _U64)
    t = z >> _S30
    z ^= t
    z *= _M1
    np.right_shift(z, _S27, out=t)
    z ^= t
    z *= _M2
    np.right_shift(z, _S31, out=t)
    z ^= t
    return z


def null_hash(seed: int) -> int:
    """The hash that null stands for in a field with `seed`."""
    return int(mix64(np.array([NULL_KEY], dtype=np.int64), seed)[0])


def xxh3_expr(expr: pl.Expr, seed: int) -> pl.Expr:
    """Polars expression: String column -> UInt64 xxh3_64 hashes, null -> null_hash(seed)."""
    return (
        plh.NonCryptographicHashingNameSpace(expr)
        .xxh3_64(seed=seed)
        .fill_null(pl.lit(null_hash(seed), pl.UInt64))
    )


def xxh3_strings(values: list[str | None], seed: int) -> np.ndarray:
    """xxh3_64 of a few Python strings (None -> null_hash): list (N,) -> uint64 (N,)."""
    s = pl.Series("v", values, dtype=pl.String).to_frame()
    return s.select(xxh3_expr(pl.col("v"), seed)).to_series().to_numpy()


def field_seed(name: str, base_seed: int) -> int:
    """The per-field hash seed: low 32 bits of xxh3_64(name, seed=base_seed)."""
    return int(xxh3_strings([name], base_seed % (1 << 64))[0]) & 0xFFFFFFFF


# --- the Criteo rule, exactly: floor(ln(x)^2) for x > 2 through integer thresholds ----------


def _criteo_key_scalar(x: int) -> int:  # the definition (libffm Criteo scripts)
    return x if x <= 2 else int(math.log(x) ** 2)


@functools.lru_cache(maxsize=1)
def _criteo_thresholds() -> np.ndarray:
    """T[k-1] = smallest integer x > 2 with floor(ln(x)^2) >= k, k = 1 .. K (int64 (K,)).

    Found by bisection on the scalar definition (monotone in x), so the vectorised rule equals
    int(math.log(x) ** 2) exactly, whatever float rounding near the boundaries does.
    """
    out, k = [], 1
    while True:
        guess = math.exp(math.sqrt(k))
        if guess >= 2**63 - 1:
            break
        lo = max(2, int(guess * (1 - 1e-9)) - 2)  # key(lo) < k (or lo == 2, below the rule)
        hi = int(guess * (1 + 1e-9)) + 2  # key(hi) >= k
        while _criteo_key_scalar(hi) < k:
            hi *= 2
        while lo > 2 and _criteo_key_scalar(lo) >= k:
            lo //= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _criteo_key_scalar(mid) >= k else (mid, hi)
        if hi >= 2**63 - 1:
            break
        out.append(hi)
        k += 1
    return np.array(out, dtype=np.int64)


def criteo_bucket(x: np.ndarray) -> np.ndarray:
    """The Criteo rule on int64 values (N,) -> int64 keys (N,): x if x <= 2 else floor(ln(x)^2).

    Exact (binary search in integer thresholds, no float rounding at run time). NULL_KEY maps
    to itself (it is <= 2), so a filled null keeps its own key.
    """
    x = np.asarray(x, dtype=np.int64)
    return np.where(x <= 2, x, np.searchsorted(_criteo_thresholds(), x, side="right"))


# Fast path: raw values in [_LO, _HI) (nearly all real data) go through two table lookups,
# raw -> key slot -> hash; the raw table's extra last entry is the null slot, where clipped
# out-of-range values land too (those that are not null are then fixed exactly).
_LO, _HI = -1024, 1 << 16


@functools.lru_cache(maxsize=1)
def _raw_lut() -> np.ndarray:
    keys = criteo_bucket(np.arange(_LO, _HI, dtype=np.int64))
    null_slot = len(_criteo_thresholds()) + 1 - _LO
    return np.append(keys - _LO, null_slot).astype(np.intp)


@functools.lru_cache(maxsize=256)
def _hash_lut(seed: int) -> np.ndarray:
    """uint64 (M,): hashes of keys _LO .. max key, then the null hash."""
    keys = np.arange(_LO, len(_criteo_thresholds()) + 1, dtype=np.int64)
    return np.append(mix64(keys, seed), np.uint64(null_hash(seed)))


def criteo_bucket_hashes(x: np.ndarray, seed: int) -> np.ndarray:
    """mix64(criteo_bucket(x), seed) for int64 x (N,) (nulls as NULL_KEY) -> uint64 (N,)."""
    x = np.asarray(x, dtype=np.int64)
    size = np.uint64(_HI - _LO)
    idx = (x - _LO).view(np.uint64)
    np.minimum(idx, size, out=idx)
    h = np.take(_hash_lut(seed), np.take(_raw_lut(), idx.view(np.int64)))
    odd = np.flatnonzero(idx == size)
    if len(odd):
        odd = odd[x[odd] != NULL_KEY]
        h[odd] = mix64(criteo_bucket(x[odd]), seed)
    return h


def quantile_bucket(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Number of edges <= x: float64 (N,), sorted edges (E,) -> int64 keys (N,) in [0, E]."""
    return np.searchsorted(edges, x, side="right").astype(np.int64)
