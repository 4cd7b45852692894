"""Stable hashing and the Criteo bucketiser: known answers, golden ids and slow twins."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ravfm.config import FeatureConfig
from ravfm.data.schemas import CRITEO, MOVIELENS
from ravfm.features.hashing import (
    NULL_KEY,
    criteo_bucket,
    criteo_bucket_hashes,
    field_seed,
    mix64,
    null_hash,
    quantile_bucket,
    xxh3_strings,
)
from ravfm.features.spec import build_spec
from ravfm.features.transform import transform

M64 = (1 << 64) - 1


def py_mix64(x: int, seed: int) -> int:
    """splitmix64 output for state x + seed + gamma, in Python integers (the definition)."""
    z = (x + seed + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_criteo(v: int) -> int:
    """The libffm Criteo rule as its scripts state it."""
    return v if v <= 2 else int(math.log(v) ** 2)


def test_xxh3_and_splitmix_match_their_published_known_answers():
    assert int(xxh3_strings([""], 0)[0]) == 0x2D06800538D394C2  # XXH3_64bits("")
    assert int(mix64(np.array([0]), 0)[0]) == 0xE220A8397B1DCDAF  # splitmix64(0), 1st output


def test_mix64_matches_python_twin_on_edge_values():
    xs = [0, 1, -1, 2, 196, 2**31, -(2**63), 2**63 - 1, 123456789012345]
    for seed in (0, 1, 2**32 - 1, 3138018052):
        got = mix64(np.array(xs, dtype=np.int64), seed)
        assert [int(v) for v in got] == [py_mix64(x, seed) for x in xs]
    assert null_hash(5) == py_mix64(NULL_KEY, 5)


def test_null_string_hashes_to_the_field_null_hash():
    got = xxh3_strings(["a", None, ""], 42)
    assert int(got[1]) == null_hash(42)
    assert len({int(v) for v in got}) == 3


@pytest.mark.parametrize(
    "v, key",
    [(-1, -1), (0, 0), (1, 1), (2, 2), (3, 1), (10, 5), (1000, 47), (-5, -5), (20, 8)],
)
def test_criteo_bucketiser_hand_computed_table(v, key):
    # ln(3)^2 = 1.207, ln(10)^2 = 5.302, ln(1000)^2 = 47.717, ln(20)^2 = 8.974
    assert int(criteo_bucket(np.array([v]))[0]) == key


def test_criteo_bucketiser_null_keeps_its_own_key():
    assert int(criteo_bucket(np.array([NULL_KEY]))[0]) == NULL_KEY


def test_criteo_bucketiser_matches_definition_everywhere():
    rng = np.random.default_rng(0)
    xs = np.concatenate(
        [
            np.arange(-2000, 70000),  # the lookup table's range and both its ends
            rng.integers(-(2**62), 2**62, 2000),
            10 ** np.arange(0, 19),
            np.array([2**63 - 1, -(2**63) + 1, 65535, 65536, -1024, -1025]),
        ]
    ).astype(np.int64)
    # thresholds exp(sqrt(k)) rounded, where float rounding would bite first
    ks = np.arange(1, 1900)
    edge = np.ceil(np.exp(np.sqrt(ks))).clip(3, 2**62).astype(np.int64)
    xs = np.concatenate([xs, edge - 1, edge, edge + 1])
    want = np.array([py_criteo(int(v)) for v in xs])
    assert np.array_equal(criteo_bucket(xs), want)


def test_criteo_bucket_hashes_equal_mix_of_bucket_including_nulls_and_outliers():
    xs = np.array([NULL_KEY, -1, 0, 2, 3, 65535, 65536, 10**12, -5000, -1024, -1025], np.int64)
    for seed in (0, 77):
        want = [null_hash(seed) if x == NULL_KEY else py_mix64(py_criteo(int(x)), seed) for x in xs]
        assert [int(h) for h in criteo_bucket_hashes(xs, seed)] == want


def test_quantile_bucket_counts_edges_at_or_below():
    edges = np.array([0.5, 2.0, 10.0])
    got = quantile_bucket(np.array([-1.0, 0.5, 0.7, 2.0, 9.9, 10.0, 1e9]), edges)
    assert got.tolist() == [0, 1, 1, 2, 2, 3, 3]


def test_field_seeds_are_pinned():
    assert field_seed("C1", 0) == 1620691507
    assert field_seed("I1", 0) == 1375598216
    assert field_seed("user_id", 0) == 2413580193
    assert field_seed("genres", 0) == 3138018052
    assert field_seed("C1", 7) == 3489141325


def test_golden_ids_criteo():
    """A change of polars, polars-hash or our maps changes these ids and must fail here."""
    import polars as pl

    spec = build_spec(
        {"dataset": "criteo", "schema": CRITEO.columns, "label": "label"}, FeatureConfig()
    )
    row = {c: None for c in CRITEO.columns}
    # C1..C26 arrive as UInt32: convert decodes Criteo's 8-hex-digit text ("68fd1e64")
    row.update(label=1, C1=0x68FD1E64, C2=0x80E26C9B, C26=0x9727DD16, I1=1, I2=-1, I3=1000)
    df = pl.DataFrame([row], schema={k: getattr(pl, v) for k, v in CRITEO.columns.items()})
    ids = transform(df, spec)["ids"][0]
    col = {f.name: i for i, f in enumerate(spec.fields)}
    got = {n: int(ids[col[n]]) for n in ("C1", "C2", "C26", "C3", "I1", "I2", "I3", "I4")}
    assert got == GOLDEN_CRITEO
    mask = (1 << 20) - 1  # the documented map, spelled out for C1 and I3
    assert got["C1"] == 1 + (py_mix64(0x68FD1E64, field_seed("C1", 0)) & mask)
    assert got["I3"] == 1 + (py_mix64(47, field_seed("I3", 0)) & mask)


# C3 and I4 are null: each field's own null row. I1=1 and I2=-1 stay as-is, I3=1000 -> 47.
# (Schema revision 2 stores C1..C26 as UInt32, so they hash with splitmix64, not xxh3 of the
# text; the ids of revision 1 shards were C1 776065, C2 985971, C26 144639.)
GOLDEN_CRITEO = {
    "C1": 934799,
    "C2": 891998,
    "C26": 837879,
    "C3": 57725,
    "I1": 988433,
    "I2": 277960,
    "I3": 616287,
    "I4": 513912,
}


def test_golden_ids_movielens_integer_and_genre():
    import polars as pl

    schema = dict(MOVIELENS.columns)
    spec = build_spec(
        {"dataset": "movielens", "schema": schema, "label": "rating"}, FeatureConfig(hash_bits=16)
    )
    df = pl.DataFrame(
        {
            "user_id": [196],
            "item_id": [242],
            "rating": [3.0],
            "timestamp": [881250949],
            "age": [49],
            "gender": ["M"],
            "occupation": ["writer"],
            "zip": ["55105"],
            "genres": [["Comedy", "Drama"]],
        },
        schema={
            k: (pl.List(pl.String) if v == "List(String)" else getattr(pl, v))
            for k, v in schema.items()
        },
    )
    out = transform(df, spec)
    assert out["ids"][0].tolist() == GOLDEN_MOVIELENS
    assert out["values"][0].tolist() == [1.0] * 5 + [0.5, 0.5] + [0.0] * 8
    assert out["label"].tolist() == [3.0]


# user, item, age, gender, occupation, then genres (width 10): Comedy, Drama and 8 pads.
GOLDEN_MOVIELENS = [10333, 17806, 32508, 37726, 806, 3207, 62451, 0, 0, 0, 0, 0, 0, 0, 0]
