"""Synthetic data: real formats that round-trip through convert, realistic shape, learnable
labels (the oracle beats chance by far), determinism."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ravfm.data.convert import convert
from ravfm.data.index import split_paths
from ravfm.data.planted import fm_logit, hashed_params, hex8, zipf_ranks
from ravfm.data.synth import read_oracle, synth
from ravfm.errors import UserError


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC from ranks (ties get average ranks)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    s = np.asarray(score)[order]
    _, start, count = np.unique(s, return_index=True, return_counts=True)
    for a, c in zip(start[count > 1], count[count > 1]):
        ranks[order[a : a + c]] = ranks[order[a : a + c]].mean()
    pos = label.astype(bool)
    p, n = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - p * (p + 1) / 2) / (p * n))


def _all(out) -> pl.DataFrame:
    return pl.concat(
        [pl.read_parquet(p) for s in ("train", "valid", "test") for p in split_paths(out, s)]
    )


def test_auc_helper_matches_pair_counting():
    rng = np.random.default_rng(0)
    score, label = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pairs = [
        (1.0 if a > b else 0.5 if a == b else 0.0)
        for a, la in zip(score, label)
        for b, lb in zip(score, label)
        if la and not lb
    ]
    assert auc(score, label) == pytest.approx(np.mean(pairs))


def test_fm_logit_matches_the_pairwise_double_loop():
    rng = np.random.default_rng(1)
    w = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
    v = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(4)]  # F=4 x (K=3, n=5)
    slow = np.array(
        [
            sum(w[f][i] for f in range(4))
            + sum(v[f][:, i] @ v[g][:, i] for f in range(4) for g in range(f + 1, 4))
            for i in range(5)
        ]
    )
    np.testing.assert_allclose(fm_logit(w, v), slow, rtol=1e-5, atol=1e-5)


def test_building_blocks_hex_zipf_and_hashed_params_are_stable():
    codes = np.array([0, 0xDEADBEEF, 255], dtype=np.uint32)
    assert hex8(codes, np.array([True, False, True])).to_pylist() == ["00000000", None, "000000ff"]
    r = zipf_ranks(np.random.default_rng(0), 200_000, 1000, 1.2)
    counts = np.bincount(r, minlength=1000)
    assert r.min() == 0 and r.max() < 1000 and counts[0] > 3 * counts[9] > 0
    w1, v1 = hashed_params(np.uint64(42), np.array([5, 7, 5]), 1.0, 1.0)
    assert w1[0] == w1[2] and (v1[:, 0] == v1[:, 2]).all() and w1[0] != w1[1]


def test_criteo_synth_round_trips_with_realistic_shape_and_learnable_labels(tmp_path):
    src = tmp_path / "criteo.txt"
    synth("criteo", 30_000, src, seed=3)
    lines = src.read_bytes().split(b"\n")
    assert len(lines) == 30_001 and all(line.count(b"\t") == 39 for line in lines[:-1])
    s = convert("criteo", str(src), tmp_path / "out", split="train")
    assert s["rows"] == 30_000 and s["rejected"] == 0
    df = pl.read_parquet(split_paths(tmp_path / "out", "train"))
    p = np.asarray(read_oracle(src))
    y = df["label"].to_numpy()
    assert p.shape == (30_000,) and 0.22 < y.mean() < 0.28 and abs(p.mean() - 0.25) < 0.02
    assert auc(p, y) > 0.72
    nu = {c: df[c].n_unique() for c in ("C9", "C20", "C3", "C12")}
    assert nu["C9"] <= 4 and nu["C20"] <= 5 and nu["C3"] > 5000 and nu["C12"] > 5000
    assert 0.70 < df["C22"].null_count() / len(df) < 0.82 and df["C1"].null_count() == 0
    assert 0.40 < df["I1"].null_count() / len(df) < 0.50 and (df["I2"] < 0).any()
    top = df["C6"].value_counts(sort=True)["count"]
    assert top[0] > 3 * top[5]  # Zipf-like head


def test_avazu_synth_round_trips_with_hour_order_and_ctr(tmp_path):
    src = tmp_path / "avazu.csv"
    synth("avazu", 20_000, src, seed=1)
    s = convert("avazu", str(src), tmp_path / "out", split="train")
    assert s["rows"] == 20_000 and s["rejected"] == 0
    df = pl.read_parquet(split_paths(tmp_path / "out", "train"))
    assert df["hour"].is_sorted() and df["hour"].n_unique() == 240
    assert df["hour"][0] == 14102100 and df["hour"][-1] == 14103023
    assert df["id"].n_unique() == 20_000
    y, p = df["click"].to_numpy(), np.asarray(read_oracle(src))
    assert 0.14 < y.mean() < 0.20 and auc(p, y) > 0.72
    assert df["C1"].n_unique() <= 7 and df["device_ip"].n_unique() > 5000


def test_movielens_synth_round_trips_and_the_oracle_explains_ratings(tmp_path):
    out = tmp_path / "ml"
    synth("movielens", 50_000, out, seed=2)
    s = convert("movielens", str(out), tmp_path / "shards", split="train")
    assert s["rows"] == 50_000 and s["variant"] == "ml-100k" and s["rejected"] == 0
    df = pl.read_parquet(split_paths(tmp_path / "shards", "train"))
    assert (
        df.select("age", "gender", "occupation", "genres").null_count().sum_horizontal().item() == 0
    )
    r, m = df["rating"].to_numpy(), np.asarray(read_oracle(out))
    assert set(np.unique(r)) <= {1, 2, 3, 4, 5}
    rmse_oracle = np.sqrt(np.mean((r - m) ** 2))
    rmse_mean = np.sqrt(np.mean((r - r.mean()) ** 2))
    assert rmse_oracle < 0.85 * rmse_mean


def test_synth_is_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    synth("criteo", 3000, a, seed=5)
    synth("criteo", 3000, b, seed=5)
    synth("criteo", 3000, c, seed=6)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert np.array_equal(read_oracle(a), read_oracle(b))


def test_synth_and_read_oracle_user_errors(tmp_path):
    with pytest.raises(UserError, match="--rows must be positive"):
        synth("criteo", 0, tmp_path / "x.txt")
    with pytest.raises(UserError, match="no oracle file"):
        read_oracle(tmp_path / "x.txt")


def test_synthetic_movielens_has_the_standard_splits(tmp_path):
    import polars as pl

    from ravfm.data.synth import synth

    out = synth("movielens", 6000, str(tmp_path / "ml"), seed=3)
    cols = ["u", "i", "r", "t"]

    def read(name):
        return pl.read_csv(out / name, separator="\t", has_header=False, new_columns=cols)

    data = read("u.data")
    tests = [read(f"u{k}.test") for k in range(1, 6)]
    assert sum(len(t) for t in tests) == len(data)  # five disjoint folds cover every rating
    assert pl.concat(tests).sort(cols).equals(data.sort(cols))
    for k in range(1, 6):
        assert len(read(f"u{k}.base")) + len(tests[k - 1]) == len(data)
    ua = read("ua.test").group_by("u").len()
    assert ua["len"].max() == 10 and ua["len"].min() == 10
    assert len(read("ua.base")) + len(read("ua.test")) == len(data)
