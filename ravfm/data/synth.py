"""`ravfm synth`: synthetic raw data in each real format, with labels from a planted FM model.

criteo     OUT is a tab-separated DAC-style train file (label, I1..I13, C1..C26), with Kaggle DAC
           per-field cardinalities (3 to ~10M values), Zipf-like value frequencies and missing
           rates; labels ~ Bernoulli(sigmoid(planted FM)), calibrated to ~25% CTR.
avazu      OUT is an Avazu-style CSV with header, rows in hour order over 10 days, ~17% CTR.
movielens  OUT is a directory laid out like ml-100k (u.data, u.user, u.item, u.genre); ratings
           1-5 drawn from a planted biased-MF model with user/genre side effects.

Beside the data the generator writes each row's true click probability (or true mean
rating) as float32, in data-line order: `OUT.oracle.npy` for files, `OUT/oracle.npy` for the
movielens directory; `read_oracle(OUT)` loads it (memory-mapped). Output depends only on
(dataset, rows, seed): chunk c of 2^18 rows draws from its own stream seeded by (seed, c), and
chunk c + 1 is generated while chunk c is written, so memory is bounded by two chunks.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

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
from ravfm.data.schemas import CRITEO_CAT, CRITEO_INT
from ravfm.errors import UserError

__all__ = ["synth", "read_oracle", "oracle_path", "write_chunks", "CHUNK", "CRITEO_CARD"]

CHUNK = 1 << 18
PILOT = 1 << 16
# Kaggle DAC train.txt: distinct values and share of empty fields per categorical column.
CRITEO_CARD = (
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
)
_CRITEO_CAT_NULL = (
    0,
    0,
    0.034,
    0.034,
    0,
    0.12,
    0,
    0,
    0,
    0,
    0,
    0.034,
    0,
    0,
    0,
    0.034,
    0,
    0,
    0.44,
    0.44,
    0.034,
    0.76,
    0,
    0.034,
    0.44,
    0.44,
)
# integer columns: (share empty, mean and sd of log(1 + value))
_CRITEO_INT = (
    (0.45, 0.7, 1.2),
    (0, 2.5, 2.0),
    (0.21, 2.0, 1.5),
    (0.22, 1.7, 1.0),
    (0.026, 7.5, 2.5),
    (0.22, 3.5, 1.8),
    (0.04, 1.5, 1.5),
    (0.0005, 2.3, 1.2),
    (0.04, 3.7, 1.6),
    (0.45, 0.4, 0.5),
    (0.04, 1.0, 1.0),
    (0.76, 0.5, 1.2),
    (0.22, 1.8, 1.2),
)


def oracle_path(out: str | os.PathLike) -> Path:
    """Where synth(…, out) writes the oracle: OUT/oracle.npy for a directory, else OUT.oracle.npy."""
    out = Path(out)
    if out.suffix == ".npy":
        return out
    return out / "oracle.npy" if out.is_dir() else Path(f"{out}.oracle.npy")


def read_oracle(path: str | os.PathLike) -> np.ndarray:
    """True click probability (or mean rating) per data line, (N,) float32, memory-mapped."""
    p = oracle_path(path)
    if not p.exists():
        raise UserError(f"{path}: no oracle file {p}; it is written by `ravfm synth`")
    return np.load(p, mmap_mode="r")


def _chunks(rows: int) -> list[tuple[int, int]]:
    return [(c, min(CHUNK, rows - c * CHUNK)) for c in range((rows + CHUNK - 1) // CHUNK)]


def _criteo_chunk(
    rng: np.random.Generator, n: int, keys: list[np.uint64]
) -> tuple[dict[str, object], np.ndarray]:
    """Columns of n Criteo rows (label excluded) and their planted logit without bias (n,)."""
    cols: dict[str, object] = {}
    ws, vs = [], []
    for j, (name, (miss, mu, sd)) in enumerate(zip(CRITEO_INT, _CRITEO_INT)):
        g = rng.normal(mu, sd, n)
        x = np.floor(np.expm1(np.clip(g, 0, 16))).astype(np.int64)
        if j == 1:  # I2 has small negative values in the real data
            x = np.where(rng.random(n) < 0.05, -rng.integers(1, 4, n), x)
        present = rng.random(n) >= miss
        cols[name] = pa.array(x, mask=~present) if miss else pa.array(x)
        coef = np.float32(0.25 * np.sin(1.7 * j + 0.3))
        ws.append(np.where(present, coef * (g - mu) / sd, 0).astype(np.float32))
    a_of = lambda card: 1.05 + 0.25 / (1.0 + np.log10(card))  # noqa: E731 - heavier heads for small fields
    for f, (name, card, miss) in enumerate(zip(CRITEO_CAT, CRITEO_CARD, _CRITEO_CAT_NULL)):
        r = zipf_ranks(rng, n, card, a_of(card))
        present = rng.random(n) >= miss if miss else np.ones(n, dtype=bool)
        cols[name] = hex8(value_code(keys[f], r), present)
        w, v = hashed_params(keys[f], r, 0.45, 0.4)
        m = present.astype(np.float32)
        ws.append(w * m)
        vs.append(v * m)
    return cols, fm_logit(ws, vs)


def write_chunks(
    out: Path, rows: int, make, oracle_file: Path, *, header: bool = False, separator: str = "\t"
) -> None:
    """Write make(c, n) -> (DataFrame, oracle (n,)) for each chunk c of n rows to OUT as CSV,
    and the oracle to ORACLE_FILE; chunk c + 1 is generated while chunk c is written."""
    oracle = np.lib.format.open_memmap(oracle_file, mode="w+", dtype=np.float32, shape=(rows,))

    def write(c: int, df: pl.DataFrame | pa.Table, p: np.ndarray) -> None:
        if isinstance(df, pa.Table):  # no Polars copy: ~15% faster for 40 columns
            opts = pacsv.WriteOptions(
                include_header=header and c == 0, delimiter=separator, quoting_style="none"
            )
            pacsv.write_csv(df, f, opts)
        else:
            df.write_csv(
                f, include_header=header and c == 0, separator=separator, quote_style="never"
            )
        oracle[c * CHUNK : c * CHUNK + len(p)] = p

    with open(out, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="ravfm-synth") as pool:
        pending = None
        for c, n in _chunks(rows):
            df, p = make(c, n)
            if pending is not None:
                pending.result()
            pending = pool.submit(write, c, df, p)
        if pending is not None:
            pending.result()
    oracle.flush()


def _synth_criteo(rows: int, out: Path, seed: int) -> None:
    keys = [field_key(seed, f"criteo/{c}") for c in CRITEO_CAT]
    _, z = _criteo_chunk(np.random.default_rng([seed, 1 << 40]), PILOT, keys)
    b0 = calibrate_bias(z, 0.25)

    def make(c: int, n: int) -> tuple[pa.Table, np.ndarray]:
        rng = np.random.default_rng([seed, c])
        cols, z = _criteo_chunk(rng, n, keys)
        p = sigmoid(z + b0).astype(np.float32)
        label = (rng.random(n) < p).astype(np.int8)
        return pa.table({"label": pa.array(label), **cols}), p

    write_chunks(out, rows, make, oracle_path(out))


def synth(dataset: str, rows: int, out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write ROWS synthetic rows of DATASET at OUT (plus the oracle sidecar); returns OUT."""
    if rows < 1:
        raise UserError(f"--rows must be positive, got {rows}")
    out = Path(out)
    if dataset == "criteo":
        out.parent.mkdir(parents=True, exist_ok=True)
        _synth_criteo(rows, out, seed)
    elif dataset == "avazu":
        from ravfm.data.synth_avazu import synth_avazu

        out.parent.mkdir(parents=True, exist_ok=True)
        synth_avazu(rows, out, seed, oracle_path(out))
    elif dataset == "movielens":
        from ravfm.data.synth_movielens import synth_movielens

        out.mkdir(parents=True, exist_ok=True)
        synth_movielens(rows, out, seed, out / "oracle.npy")
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose criteo, avazu or movielens")
    return out
