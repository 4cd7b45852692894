"""Train/valid/test assignment by a seeded hash of the row number (stable, order-free).

A row's split depends only on (seed, row number, ratios), never on the other rows, so any
reader can recompute it and re-converting with the same options reproduces the same split.
The row number is the 0-based index of the data line in the whole source (header lines
excluded, rejected lines included), counted across the source's files in sorted order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ravfm.data.index import SPLITS

__all__ = ["HASH_RULE", "splitmix64", "hash_split", "split_thresholds"]

HASH_RULE = (
    "u = (splitmix64(row + seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) >> 11) / 2**53; "
    "split = first i with u < cumsum(ratios)[i] / sum(ratios)"
)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_OFFSET = np.uint64(0x632BE59BD9B4E019)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer (Steele et al. 2014), elementwise on uint64. x: (N,) -> (N,)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def split_thresholds(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (len(SPLITS),) or (r < 0).any() or r.sum() <= 0:
        raise ValueError(
            f"split ratios must be {len(SPLITS)} non-negative numbers with a positive "
            f"sum, got {tuple(ratios)}"
        )
    t = np.cumsum(r) / r.sum()
    t[-1] = 1.0 + 1e-9  # u < 1 always lands somewhere, whatever the rounding
    return t


def hash_split(rows: np.ndarray, seed: int, ratios: Sequence[float]) -> np.ndarray:
    """Split code per row (0 train, 1 valid, 2 test). rows: (N,) int64 row numbers -> (N,) int8."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed % 2**64) * _GOLDEN + _OFFSET
    u = (splitmix64(z) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return np.searchsorted(split_thresholds(ratios), u, side="right").astype(np.int8)
