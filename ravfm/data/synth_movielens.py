"""MovieLens-shaped synthetic ratings in the ml-100k layout (u.data, u.user, u.item, u.genre).

Sizes scale with ROWS like the real releases (100K ratings: 943 users, 1,682 movies). Users
and movies have Zipf-like activity and popularity. A rating r in 1..5 is drawn with
P(r) ~ exp(-(r - m)^2 / (2 * 0.9^2)), where m is a planted biased matrix factorisation with
user side effects (age, gender) and genre effects; the oracle is E[r] under that law.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ravfm.data.movielens import _GENRES_100K
from ravfm.data.synth import write_chunks

__all__ = ["synth_movielens", "OCCUPATIONS"]

OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
_K, _SIGMA, _MEAN = 4, 0.9, 3.53
_LEVELS = np.arange(1, 6, dtype=np.float32)


def _sizes(rows: int) -> tuple[int, int]:
    users = max(20, round(943 * rows / 100_000))
    items = max(20, round(1682 * (rows / 100_000) ** 0.5))
    return users, items


def _rating_law(m: np.ndarray) -> np.ndarray:
    """P(r) for r = 1..5 given planted means m: (n,) -> (n, 5)."""
    logp = -((_LEVELS[None, :] - m[:, None]) ** 2) / (2 * _SIGMA**2)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _tables(rng: np.random.Generator, users: int, items: int, out: Path) -> dict[str, np.ndarray]:
    """Write u.user, u.item, u.genre; return the planted per-user and per-item parameters."""
    age = np.clip(rng.normal(33, 12, users), 7, 73).astype(np.int64)
    male = rng.random(users) < 0.71
    occ = rng.integers(0, len(OCCUPATIONS), users)
    zips = rng.integers(0, 100_000, users)
    pl.DataFrame(
        {
            "id": np.arange(1, users + 1),
            "age": age,
            "gender": np.where(male, "M", "F"),
            "occupation": np.asarray(OCCUPATIONS)[occ],
            "zip": [f"{z:05d}" for z in zips],
        }
    ).write_csv(out / "u.user", include_header=False, separator="|", quote_style="never")
    g = len(_GENRES_100K)
    flags = (rng.random((items, g)) < 0.12).astype(np.int64)
    flags[np.arange(items), rng.integers(1, g, items)] = 1  # at least one real genre
    year = rng.integers(1930, 1999, items)
    item_cols = {
        "id": np.arange(1, items + 1),
        "title": [f"Synthetic Movie {i} ({y})" for i, y in zip(range(1, items + 1), year)],
        "release": [f"01-Jan-{y}" for y in year],
        "video": [""] * items,
        "url": [f"http://example.invalid/movie/{i}" for i in range(1, items + 1)],
    }
    item_cols.update({f"g{j}": flags[:, j] for j in range(g)})
    pl.DataFrame(item_cols).write_csv(
        out / "u.item", include_header=False, separator="|", quote_style="never"
    )
    (out / "u.genre").write_text("".join(f"{n}|{j}\n" for j, n in enumerate(_GENRES_100K)) + "\n")
    genre_w = rng.normal(0, 0.25, g).astype(np.float32)
    return {
        "bu": (rng.normal(0, 0.35, users) + 0.15 * (age - 33) / 12 + 0.05 * male).astype(
            np.float32
        ),
        "bi": (rng.normal(0, 0.45, items) + flags @ genre_w / np.maximum(flags.sum(1), 1)).astype(
            np.float32
        ),
        "pu": rng.normal(0, 0.45, (users, _K)).astype(np.float32),
        "qi": rng.normal(0, 0.45, (items, _K)).astype(np.float32),
        "act": rng.permutation(users),
        "pop": rng.permutation(items),
    }


def synth_movielens(rows: int, out: Path, seed: int, oracle_file: Path) -> None:
    users, items = _sizes(rows)
    par = _tables(np.random.default_rng([seed, 1 << 41]), users, items, out)
    t0 = 874_724_710  # 1997-09-20, the start of ml-100k

    def make(c: int, n: int) -> tuple[pl.DataFrame, np.ndarray]:
        rng = np.random.default_rng([seed, c])
        # Zipf-like activity: a power of a uniform picks low ranks more often
        u = par["act"][(users * rng.random(n) ** 2.2).astype(np.int64).clip(0, users - 1)]
        i = par["pop"][(items * rng.random(n) ** 2.6).astype(np.int64).clip(0, items - 1)]
        m = _MEAN + par["bu"][u] + par["bi"][i] + (par["pu"][u] * par["qi"][i]).sum(axis=1)
        law = _rating_law(m.astype(np.float32))  # (n, 5)
        oracle = (law * _LEVELS).sum(axis=1).astype(np.float32)
        r = 1 + (rng.random(n)[:, None] > law.cumsum(axis=1)).sum(axis=1)
        ts = t0 + rng.integers(0, 215 * 86_400, n)
        df = pl.DataFrame({"user": u + 1, "item": i + 1, "rating": np.minimum(r, 5), "ts": ts})
        return df, oracle

    write_chunks(out / "u.data", rows, make, oracle_file, separator="\t")
    _standard_splits(out, seed)


def _standard_splits(out: Path, seed: int) -> None:
    """u1..u5 (.base/.test: five disjoint 20% test folds) and ua/ub (10 test ratings per user
    with more than 20), shaped like ml-100k's, so the MovieLens jobs' `split: u1` runs on
    synthetic data too. Rows keep u.data's line order (the oracle's order) inside each file."""
    df = pl.read_csv(
        out / "u.data", separator="\t", has_header=False, new_columns=["u", "i", "r", "t"]
    )
    rng = np.random.default_rng([seed, 1 << 42])
    fold = rng.permutation(len(df)) % 5
    order = pl.Series(rng.permutation(len(df)))  # a random rank of each rating within its user
    rank = (
        df.with_columns(o=order).select(pl.col("o").rank("ordinal").over("u") - 1)["o"].to_numpy()
    )
    count = df.select(pl.len().over("u"))["len"].to_numpy()

    def write(name: str, mask: np.ndarray) -> None:
        for suffix, part in (("test", mask), ("base", ~mask)):
            df.filter(pl.Series(part)).write_csv(
                out / f"{name}.{suffix}", include_header=False, separator="\t", quote_style="never"
            )

    for k in range(5):
        write(f"u{k + 1}", fold == k)
    many = count > 20
    write("ua", many & (rank < 10))
    write("ub", many & (rank >= 10) & (rank < 20))
