"""The real samples: convert -> stats -> transform gives the expected shapes and ids in [0, N)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ravfm.config import FeatureConfig
from ravfm.data.convert import convert
from ravfm.data.index import read_index, split_paths
from ravfm.features.spec import FeatureSpec
from ravfm.features.stats import load_frequencies, run_stats
from ravfm.features.transform import transform

SAMPLES = {  # format, path under shared data, expected F (genres/idx width measured on train)
    "criteo": ("criteo", "criteo/dac_sample_8k.txt", 39),
    "avazu": ("avazu", "avazu/avazu_sample_9k.csv", 23),
    "movielens": ("movielens", "movielens/ml-100k", 5 + 6),  # ml-100k: at most 6 genres
    "frappe": ("libsvm", "frappe/frappe.validation.libfm", 10),  # 10 one-hot fields per row
}


@pytest.fixture(scope="module", params=sorted(SAMPLES))
def sample(request, shared_data, tmp_path_factory):
    fmt, rel, width = SAMPLES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    convert(fmt, str(shared_data / rel), root / "shards", rows_per_shard=20_000)
    spec = run_stats(str(root / "shards"), str(root / "spec"), FeatureConfig(hash_bits=18))
    return request.param, root, spec, width


def _read(root, split: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in split_paths(root / "shards", split)])


def test_sample_shapes_and_ids_in_range(sample):
    name, root, spec, width = sample
    assert spec.num_fields == width
    for split in ("train", "test"):
        df = _read(root, split)
        out = transform(df.to_arrow(), spec)
        ids, values, label = out["ids"], out["values"], out["label"]
        assert ids.shape == values.shape == (df.height, width) and label.shape == (df.height,)
        assert ids.min() >= 0 and ids.max() < spec.num_rows
        assert ((ids == 0) == (values == 0.0)).all()  # padding is exactly (0, 0.0)
        assert (ids.max(axis=1) > 0).all()  # every row has features
        if spec.task == "binary":
            assert set(np.unique(label)) <= {0.0, 1.0} and 0 < label.mean() < 1
        else:
            assert label.min() >= 1.0 and label.max() <= 5.0


def test_sample_specific_facts(sample):
    name, root, spec, _ = sample
    df = _read(root, "train")
    out = transform(df, spec)
    if name == "movielens":
        assert spec.task == "regression"
        g = out["values"][:, 5:]  # genres: 1/n each over the movie's n genres
        np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-5)
    if name == "frappe":
        assert spec.task == "binary" and set(out["values"].ravel().tolist()) == {1.0}
        assert set(df["label"].unique().to_list()) == {-1.0, 1.0}
        assert out["label"].tolist() == (df["label"] > 0).cast(pl.Float32).to_list()
    if name == "criteo":  # nulls are frequent in Criteo: they get their own row per field
        c = [f.name for f in spec.fields].index("I12")
        null_rows = df["I12"].is_null().to_numpy()
        assert null_rows.any() and len(np.unique(out["ids"][null_rows, c])) == 1


def test_sample_frequencies_cover_train(sample):
    name, root, spec, _ = sample
    freq = load_frequencies(root / "spec", spec.num_rows)
    df = _read(root, "train")
    ids = transform(df, spec)["ids"]
    assert freq.sum() == (ids > 0).sum()
    assert np.array_equal(np.flatnonzero(freq), np.unique(ids[ids > 0]))
    assert read_index(root / "shards")["dataset"] == spec.dataset
    assert FeatureSpec.load(root / "spec") == spec
