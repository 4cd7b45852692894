"""Building blocks of the synthetic generators: Zipf-like value ranks, hashed per-value FM
parameters, 8-hex-digit strings, and the planted FM logit (Rendle 2010, eq. 1).

Per-value parameters are not stored: value r of field f gets its bias and latent vector from
splitmix64(key_f + r), so fields with ~10M values cost no memory and every chunk of rows agrees.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ravfm.data.split import splitmix64

__all__ = [
    "zipf_ranks",
    "field_key",
    "value_code",
    "hashed_params",
    "hex8",
    "fm_logit",
    "calibrate_bias",
    "sigmoid",
    "K",
]

K = 4  # latent factors of the planted model
_DIGITS = b"0123456789abcdef"
_HEX2 = np.frombuffer(
    b"".join(bytes((_DIGITS[i >> 4], _DIGITS[i & 15])) for i in range(256)), dtype=np.uint16
)  # byte -> its two hex digits, as they lie in memory


def zipf_ranks(rng: np.random.Generator, n: int, card: int, a: float) -> np.ndarray:
    """(n,) ranks in [0, card) with P(rank = r) ~ (r + 1)^-a (continuous bounded power law)."""
    u = rng.random(n, dtype=np.float32)
    if abs(a - 1.0) < 1e-9:
        x = np.exp(u * np.float32(np.log(card + 1.0)))
    else:
        top = np.float32((card + 1.0) ** (1.0 - a))
        x = (np.float32(1.0) - u * (np.float32(1.0) - top)) ** np.float32(1.0 / (1.0 - a))
    return np.minimum(x.astype(np.int64) - 1, card - 1).clip(0)


def field_key(seed: int, field: str) -> np.uint64:
    """A 64-bit key per (seed, field name), stable across platforms."""
    h = np.uint64(seed % 2**64)
    for ch in field.encode():
        h = splitmix64(np.array([h ^ np.uint64(ch)], dtype=np.uint64))[0]
    return h


def value_code(key: np.uint64, ranks: np.ndarray) -> np.ndarray:
    """(n,) uint32 raw value of each rank (what the data file shows, as 8 hex digits)."""
    with np.errstate(over="ignore"):
        z = splitmix64(ranks.astype(np.uint64) + key)
    return (z >> np.uint64(32)).astype(np.uint32)


def hashed_params(
    key: np.uint64, ranks: np.ndarray, w_scale: float, v_scale: float, half_rank: float = 1000.0
) -> tuple[np.ndarray, np.ndarray]:
    """Bias (n,) and latent vectors (K, n) of each rank, uniform in +-scale from a hash, damped
    by (1 + rank / half_rank)^-1/2 so that most signal sits in values frequent enough to learn."""
    with np.errstate(over="ignore"):
        z = splitmix64(ranks.astype(np.uint64) + key + np.uint64(0x5851F42D4C957F2D))
    damp = np.float32(2.0 / 4095.0) / np.sqrt(
        np.float32(1.0) + ranks.astype(np.float32) / np.float32(half_rank)
    )

    def col(j: int, scale: float) -> np.ndarray:
        u = ((z >> np.uint64(12 * j)) & np.uint64(0xFFF)).astype(np.float32) - np.float32(2047.5)
        return u * damp * np.float32(scale)

    return col(0, w_scale), np.stack([col(j, v_scale) for j in range(1, K + 1)])


def hex8(codes: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """8-lowercase-hex-digit strings of uint32 codes (n,), null where not valid (n,) bool."""
    n = len(codes)
    be = codes.astype(">u4").view(np.uint8).reshape(n, 4)  # most significant byte first
    chars = _HEX2[be].view(np.uint8)  # (n, 8) ascii bytes
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    if valid is None or valid.all():
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))
    offsets = np.concatenate(([0], np.cumsum(np.where(valid, 8, 0)))).astype(np.int32)
    bits = np.packbits(valid, bitorder="little")
    return pa.StringArray.from_buffers(
        n,
        pa.py_buffer(offsets),
        pa.py_buffer(chars[valid]),
        pa.py_buffer(bits),
        n - int(valid.sum()),
    )


def fm_logit(w: list[np.ndarray], v: list[np.ndarray]) -> np.ndarray:
    """sum_f w_f + sum_{f<g} <v_f, v_g> over fields (Rendle 2010, eq. 5: half the squared sum
    minus the sum of squares). w: F x (n,), v: F x (K, n) -> (n,)."""
    s = np.zeros_like(v[0])  # (K, n)
    sq = np.zeros_like(v[0])
    lin = np.zeros_like(w[0])
    for wf, vf in zip(w, v):
        lin += wf
        s += vf
        sq += vf * vf
    return lin + 0.5 * (s * s - sq).sum(axis=0)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def calibrate_bias(z: np.ndarray, target: float) -> float:
    """b with mean(sigmoid(z + b)) == target (bisection). z: (n,) -> scalar."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sigmoid(z.astype(np.float64) + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
