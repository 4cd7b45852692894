"""`ravfm stats`: counts equal a plain Python count, folding, widths, edges, early errors."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import polars as pl
import pytest

from ravfm.cli import main
from ravfm.config import FeatureConfig
from ravfm.data.index import write_index
from ravfm.errors import UserError
from ravfm.features import stats
from ravfm.features.spec import FeatureSpec
from ravfm.features.stats import load_frequencies, run_stats
from ravfm.features.transform import transform

SCHEMA = {"label": "Int8", "C1": "String", "C2": "String", "I1": "Int64", "tags": "List(String)"}
PL = {
    "label": pl.Int8,
    "C1": pl.String,
    "C2": pl.String,
    "I1": pl.Int64,
    "tags": pl.List(pl.String),
}


def _shard(n: int, seed: int, vocab: int = 30) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    zipf = lambda: int(rng.zipf(1.5)) % vocab  # noqa: E731 - a skewed vocabulary
    return pl.DataFrame(
        {
            "label": rng.integers(0, 2, n).tolist(),
            "C1": [None if rng.random() < 0.1 else f"a{zipf()}" for _ in range(n)],
            "C2": [f"b{zipf()}" for _ in range(n)],
            "I1": [None if rng.random() < 0.2 else int(v) for v in rng.integers(-2, 5000, n)],
            "tags": [
                None if rng.random() < 0.1 else [f"t{zipf()}" for _ in range(rng.integers(0, 5))]
                for _ in range(n)
            ],
        },
        schema=PL,
    )


@pytest.fixture
def shards(tmp_path):
    """Two train shards and a valid shard whose values never occur in train."""
    d = tmp_path / "shards"
    d.mkdir()
    frames = {
        "train-00000.parquet": _shard(700, 1),
        "train-00001.parquet": _shard(500, 2),
        "valid-00000.parquet": _shard(100, 3).with_columns(pl.lit("VALID").alias("C2")),
    }
    for name, df in frames.items():
        df.write_parquet(d / name)
    write_index(
        d,
        {
            "format_version": 1,
            "dataset": "criteo",
            "schema": SCHEMA,
            "label": "label",
            "shards": [
                {"path": k, "split": k.split("-")[0], "rows": v.height} for k, v in frames.items()
            ],
            "splits": {"train": {"rows": 1200, "shards": 2}, "valid": {"rows": 100, "shards": 1}},
        },
    )
    train = pl.concat([frames["train-00000.parquet"], frames["train-00001.parquet"]])
    return d, train


def _cfg(**kw) -> FeatureConfig:
    return FeatureConfig(hash_bits=kw.pop("hash_bits", 10), fields=("C1", "C2", "I1", "tags"), **kw)


@pytest.mark.parametrize("small_batches", [False, True])
def test_frequencies_equal_python_counter_of_transformed_train(
    shards, tmp_path, capsys, monkeypatch, small_batches
):
    d, train = shards
    if small_batches:  # many batches, merged many times: the streaming path end to end
        monkeypatch.setattr(stats, "_BATCH", 97)
        monkeypatch.setattr(stats, "_MERGE_ROWS", 50)
    spec = run_stats(str(d), str(tmp_path / "out"), _cfg())
    line = capsys.readouterr().out
    assert (
        line.startswith("ravfm stats: 1,200 train rows in 2 shard(s), 4 fields")
        and line.count("\n") == 1
    )
    assert spec.fields[-1].width == int(train["tags"].list.len().max())  # measured on train
    want = Counter(int(i) for i in transform(train, spec)["ids"].ravel() if i != 0)
    got = load_frequencies(tmp_path / "out", spec.num_rows)
    assert got.sum() == sum(want.values())
    assert {int(r): int(got[r]) for r in np.flatnonzero(got)} == dict(want)
    freq = pl.read_parquet(tmp_path / "out" / "frequencies.parquet")
    assert freq.schema == {"row": pl.Int64, "count": pl.Int64} and freq["row"].is_sorted()
    assert spec.num_fields == 3 + spec.fields[-1].width


def test_min_count_folding_matches_python_definition(shards, tmp_path):
    d, train = shards
    spec = run_stats(str(d), str(tmp_path / "mc"), _cfg(min_count=5))
    hashed = transform(train, dataclasses.replace(spec, kept_rows=None))["ids"]  # no compaction
    field_of = np.array(spec.field_index)
    pairs = Counter()  # (field, hashed row) -> count: the definition of folding written out
    for r, c in zip(hashed.ravel(), np.broadcast_to(field_of, hashed.shape).ravel()):
        if r:
            pairs[(int(c), int(r))] += 1
    totals = Counter()
    for (_, r), n in pairs.items():
        totals[r] += n
    kept = sorted(r for r, n in totals.items() if n >= 5)
    compact = {r: j + 1 for j, r in enumerate(kept)}  # kept row j -> table row j + 1
    want = {compact[r]: totals[r] for r in kept}
    for (c, r), n in pairs.items():
        if totals[r] < 5:
            oov = 1 + len(kept) + c  # one OOV row per field, after the kept rows
            want[oov] = want.get(oov, 0) + n
    assert [f.oov_row for f in spec.fields] == [1 + len(kept) + c for c in range(len(spec.fields))]
    assert spec.num_rows == 1 + len(kept) + len(spec.fields)  # sized by the rows in use
    got = load_frequencies(tmp_path / "mc", spec.num_rows)
    assert {int(r): int(got[r]) for r in np.flatnonzero(got)} == want
    assert spec.kept_rows.tolist() == kept
    # what training will see under the folded spec is exactly what the table counts
    seen = Counter(
        int(i) for i in transform(train, FeatureSpec.load(tmp_path / "mc"))["ids"].ravel() if i
    )
    assert dict(seen) == want
    assert any(r == f.oov_row for f in spec.fields for r in want)


def test_quantile_edges_fitted_on_train(shards, tmp_path):
    d, train = shards
    spec = run_stats(str(d), str(tmp_path / "q"), _cfg(numeric="quantile", quantile_buckets=4))
    edges = spec.fields[2].edges
    v = train["I1"].drop_nulls().cast(pl.Float64).to_numpy()
    np.testing.assert_allclose(edges, np.unique(np.quantile(v, [0.25, 0.5, 0.75])))
    ids = transform(train, spec)["ids"][:, 2]
    assert len(np.unique(ids)) == len(edges) + 2  # 4 buckets and the null row


def test_errors_come_before_any_work(shards, tmp_path):
    d, _ = shards
    out = tmp_path / "never"
    with pytest.raises(UserError, match="features.fields names 'C9', which the shards do not have"):
        run_stats(str(d), str(out), FeatureConfig(fields=("C1", "C9")))
    idx = json.loads((d / "_index.json").read_text())
    idx["schema"]["C2"] = "Int64"  # the index disagrees with the dataset schema it claims
    (d / "_index.json").write_text(json.dumps(idx))
    with pytest.raises(
        UserError, match=r"column 'C2' is String but the feature spec hashes it as Int64"
    ):
        run_stats(str(d), str(out), _cfg())
    assert not out.exists()


def test_load_frequencies_refuses_foreign_table(shards, tmp_path):
    d, _ = shards
    spec = run_stats(str(d), str(tmp_path / "o"), _cfg())
    with pytest.raises(UserError, match="belong to another feature spec"):
        load_frequencies(tmp_path / "o", 10)
    assert load_frequencies(tmp_path / "o", spec.num_rows).shape == (spec.num_rows,)


def test_cli_stats_writes_spec_and_reports_user_errors(shards, tmp_path, capsys):
    d, _ = shards
    out = tmp_path / "cli"
    # overrides go before --out: argparse cannot resume a nargs="*" positional after an option
    assert (
        main(
            [
                "stats",
                str(d),
                "hash_bits=12",
                "fields=[C1, C2, I1, tags]",
                "min_count=2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    spec = FeatureSpec.load(out)
    assert spec.hash_bits == 12 and spec.min_count == 2 and spec.kept_rows is not None
    assert main(["stats", str(d), "fields=[nope]", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ravfm stats: error: features.fields names 'nope'")


@pytest.mark.parametrize("dataset", ["criteo", "avazu"])
@pytest.mark.parametrize("min_count", [1, 4])
def test_fast_dense_count_equals_the_general_count(shared_data, tmp_path, dataset, min_count):
    """The dense count (scalar fields, compiled hashing, bincount) against the general
    (field, row)-pair count: the same spec, kept rows, frequencies and label statistics."""
    from ravfm.data.convert import convert

    src = {"criteo": "criteo/dac_sample_8k.txt", "avazu": "avazu/avazu_sample_9k.csv"}[dataset]
    convert(dataset, str(shared_data / src), tmp_path / "s", rows_per_shard=3000)
    cfg = FeatureConfig(hash_bits=14, min_count=min_count)
    fast = run_stats(str(tmp_path / "s"), str(tmp_path / "fast"), cfg, threads=2)
    slow = run_stats(str(tmp_path / "s"), str(tmp_path / "slow"), cfg, general=True)
    assert fast == slow and fast.fingerprint == slow.fingerprint
    assert fast.kept_rows.tolist() == slow.kept_rows.tolist()
    assert fast.label_stats == pytest.approx(slow.label_stats) and fast.label_stats["n"] > 0
    a = pl.read_parquet(tmp_path / "fast" / "frequencies.parquet")
    b = pl.read_parquet(tmp_path / "slow" / "frequencies.parquet")
    assert a.equals(b)
