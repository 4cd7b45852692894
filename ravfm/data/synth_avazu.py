"""Avazu-shaped synthetic CTR data: the 24-column CSV with header, rows in hour order over the
10 days 2014-10-21..30, per-field cardinalities of the real train set, ~17% clicks drawn from a
planted FM over the categorical fields plus hour-of-day and weekday effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ravfm.data.planted import (
    calibrate_bias,
    field_key,
    fm_logit,
    hashed_params,
    hex8,
    sigmoid,
    value_code,
    zipf_ranks,
)
from ravfm.data.split import splitmix64
from ravfm.data.synth import CHUNK, PILOT, write_chunks

__all__ = ["synth_avazu", "AVAZU_FIELDS"]

# field -> (distinct values in the real train set, Zipf exponent, kind): "hex" values are
# 8-hex-digit hashes; an integer tuple lists the real values by frequency; "int" draws
# stable integers in a realistic range.
AVAZU_FIELDS: dict[str, tuple[int, float, object]] = {
    "C1": (7, 2.5, (1005, 1002, 1010, 1012, 1007, 1001, 1008)),
    "banner_pos": (7, 2.5, (0, 1, 7, 2, 4, 5, 3)),
    "site_id": (4737, 1.15, "hex"),
    "site_domain": (7745, 1.15, "hex"),
    "site_category": (26, 1.6, "hex"),
    "app_id": (8552, 1.2, "hex"),
    "app_domain": (559, 1.4, "hex"),
    "app_category": (36, 1.7, "hex"),
    "device_id": (2686408, 1.6, "hex"),
    "device_ip": (6729486, 1.05, "hex"),
    "device_model": (8251, 1.1, "hex"),
    "device_type": (5, 3.0, (1, 0, 4, 5, 2)),
    "device_conn_type": (4, 2.5, (0, 2, 3, 5)),
    "C14": (2626, 1.1, (375, 24052)),
    "C15": (8, 2.5, (320, 300, 216, 728, 120, 1024, 480, 768)),
    "C16": (9, 2.5, (50, 250, 36, 480, 90, 20, 320, 768, 1024)),
    "C17": (435, 1.2, (112, 2758)),
    "C18": (4, 1.5, (0, 3, 2, 1)),
    "C19": (68, 1.4, (33, 1959)),
    "C20": (172, 1.3, "c20"),
    "C21": (60, 1.3, (1, 255)),
}
_DAYS, _FIRST_DAY = 10, 21
_HOUR_EFFECT = 0.25 * np.sin(np.arange(24) * 2 * np.pi / 24 + 1.0)
_DAY_EFFECT = 0.1 * np.cos(np.arange(7) * 2 * np.pi / 7)


def _values(field: str, key: np.uint64, ranks: np.ndarray, kind: object) -> pl.Series:
    if kind == "hex":
        return pl.Series(field, hex8(value_code(key, ranks)))
    if kind == "c20":  # -1 (unknown) is the most frequent value, then 100000 + code
        v = np.where(ranks == 0, -1, 100000 + (value_code(key, ranks) % 250).astype(np.int64))
    elif isinstance(kind, tuple) and len(kind) == 2:  # (low, high): a stable integer range
        lo, hi = kind
        v = lo + (value_code(key, ranks) % (hi - lo + 1)).astype(np.int64)
    else:
        v = np.asarray(kind, dtype=np.int64)[ranks]
    return pl.Series(field, v).cast(pl.String)


def _chunk(
    rng: np.random.Generator, start: int, n: int, rows: int, seed: int, keys: dict
) -> tuple[dict[str, pl.Series], np.ndarray]:
    """Columns of rows [start, start + n) (click excluded) and their logit without bias (n,)."""
    pos = np.arange(start, start + n, dtype=np.int64)
    h = pos * (24 * _DAYS) // max(rows, 1)  # hour index, non-decreasing as in the real file
    day, hour = _FIRST_DAY + h // 24, h % 24
    with np.errstate(over="ignore"):
        ids = splitmix64(
            pos.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        )
    cols = {
        "id": pl.Series("id", ids).cast(pl.String),
        "hour": pl.Series("hour", 14100000 + day * 100 + hour).cast(pl.String),
    }
    weekday = (day - 20) % 7  # 2014-10-20 was a Monday
    ws = [(_HOUR_EFFECT[hour] + _DAY_EFFECT[weekday]).astype(np.float32)]
    vs = []
    for field, (card, a, kind) in AVAZU_FIELDS.items():
        r = zipf_ranks(rng, n, card, a)
        cols[field] = _values(field, keys[field], r, kind)
        w, v = hashed_params(keys[field], r, 0.45, 0.38, half_rank=300.0)
        ws.append(w)
        vs.append(v)
    return cols, fm_logit(ws[1:], vs) + ws[0]


def synth_avazu(rows: int, out: Path, seed: int, oracle_file: Path) -> None:
    keys = {f: field_key(seed, f"avazu/{f}") for f in AVAZU_FIELDS}
    _, z = _chunk(np.random.default_rng([seed, 1 << 40]), 0, PILOT, PILOT, seed, keys)
    b0 = calibrate_bias(z, 0.17)

    def make(c: int, n: int) -> tuple[pl.DataFrame, np.ndarray]:
        rng = np.random.default_rng([seed, c])
        cols, z = _chunk(rng, c * CHUNK, n, rows, seed, keys)
        p = sigmoid(z + b0).astype(np.float32)
        click = pl.Series("click", (rng.random(n) < p).astype(np.int8))
        df = pl.DataFrame([cols["id"], click, cols["hour"], *[cols[f] for f in AVAZU_FIELDS]])
        return df, p

    write_chunks(out, rows, make, oracle_file, header=True, separator=",")
