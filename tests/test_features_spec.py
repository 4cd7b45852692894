"""FeatureSpec: defaults per dataset, layout facts, save/load, compatibility, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ravfm.config import FeatureConfig
from ravfm.data.schemas import AVAZU, CRITEO, LIBSVM, MOVIELENS
from ravfm.errors import UserError
from ravfm.features.spec import FeatureSpec, build_spec


def _index(schema, dataset="criteo", label="label"):
    return {"dataset": dataset, "schema": dict(schema), "label": label}


def test_criteo_defaults_layout_and_shape_facts():
    spec = build_spec(_index(CRITEO.columns), FeatureConfig(hash_bits=20))
    assert [f.name for f in spec.fields] == [*CRITEO.categorical, *CRITEO.numeric]
    assert spec.num_fields == 39 and spec.field_index == list(range(39))
    assert spec.num_rows == (1 << 20) + 1 + 39  # padding, hashed rows, one OOV row per field
    assert {f.hasher for f in spec.fields[:26]} == {"splitmix64"}  # UInt32 codes
    assert {(f.hasher, f.bucketiser) for f in spec.fields[26:]} == {("splitmix64", "log2")}
    assert sorted(f.oov_row for f in spec.fields) == list(range((1 << 20) + 1, spec.num_rows))
    assert spec.task == "binary" and spec.label == "label"
    assert spec.versions["polars_hash"] == "0.9.3"


def test_movielens_avazu_libsvm_defaults():
    ml = build_spec(_index(MOVIELENS.columns, "movielens", "rating"), FeatureConfig())
    assert [f.name for f in ml.fields] == [
        "user_id",
        "item_id",
        "age",
        "gender",
        "occupation",
        "genres",
    ]
    assert ml.task == "regression" and ml.fields[-1].kind == "multi"
    assert ml.num_fields == 5 + ml.fields[-1].width
    assert ml.field_index == [0, 1, 2, 3, 4] + [5] * ml.fields[-1].width
    # ml-10m and later lack the user side columns: the defaults follow the actual schema
    small = {k: MOVIELENS.columns[k] for k in ("user_id", "item_id", "rating", "genres")}
    assert [
        f.name for f in build_spec(_index(small, "movielens", "rating"), FeatureConfig()).fields
    ] == ["user_id", "item_id", "genres"]
    av = build_spec(_index(AVAZU.columns, "avazu", "click"), FeatureConfig())
    assert len(av.fields) == 23 and "id" not in [f.name for f in av.fields]
    assert [f.hasher for f in av.fields[:2]] == ["splitmix64", "splitmix64"]  # Int8 columns
    lib = build_spec(_index(LIBSVM.columns, "libsvm"), FeatureConfig(), widths={"idx": 10})
    assert lib.fields[0].value_column == "val" and lib.num_fields == 10


def test_per_field_layout_and_too_few_bits_error():
    spec = build_spec(_index(CRITEO.columns), FeatureConfig(hash_bits=16, id_space="per_field"))
    assert {f.buckets for f in spec.fields} == {1 << 10}  # 39 fields -> 64 blocks of 2^10
    assert [f.offset for f in spec.fields] == [1 + i * 1024 for i in range(39)]
    with pytest.raises(
        UserError,
        match=r"^features.hash_bits=5 is too small for 39 per-field "
        r"blocks; use at least 7 or features.id_space=shared$",
    ):
        build_spec(_index(CRITEO.columns), FeatureConfig(hash_bits=5, id_space="per_field"))


def test_missing_field_is_one_clear_error():
    with pytest.raises(UserError) as e:
        build_spec(_index(CRITEO.columns), FeatureConfig(fields=("C1", "C99")))
    msg = str(e.value)
    assert msg.startswith("features.fields names 'C99', which the shards do not have; choose from")
    assert "\n" not in msg and "label" not in msg.split("choose from")[1]


def test_quantile_without_edges_is_an_error():
    with pytest.raises(UserError, match="numeric=quantile needs edges fitted on train for I1"):
        build_spec(_index(CRITEO.columns), FeatureConfig(numeric="quantile"))


def test_save_load_round_trip_with_kept_rows(tmp_path):
    kept = np.array([3, 17, 99, 1000], np.int64)
    spec = build_spec(
        _index(CRITEO.columns), FeatureConfig(hash_bits=12, min_count=5), kept_rows=kept
    )
    path = Path(spec.save(tmp_path / "s"))
    assert path.name == "feature_spec.json" and (tmp_path / "s" / "kept_rows.npy").is_file()
    back = FeatureSpec.load(tmp_path / "s")
    assert back == spec and back.fingerprint == spec.fingerprint
    assert back.kept_rows.tolist() == kept.tolist()
    assert back.num_rows == 1 + 4 + 39  # padding row, kept rows, OOV rows: sized by rows in use
    assert [f.oov_row for f in back.fields] == list(range(5, 5 + 39))
    on_disk = json.loads(path.read_text())
    assert on_disk["num_rows"] == spec.num_rows and on_disk["num_fields"] == 39
    assert FeatureSpec.load(path) == spec  # the file itself works too


def test_load_refuses_edited_spec_and_missing_file(tmp_path):
    spec = build_spec(_index(CRITEO.columns), FeatureConfig())
    path = Path(spec.save(tmp_path))
    d = json.loads(path.read_text())
    d["fields"][0]["seed"] += 1
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match="does not match its content"):
        FeatureSpec.load(tmp_path)
    with pytest.raises(UserError, match=r"no feature_spec.json; run `ravfm stats"):
        FeatureSpec.load(tmp_path / "nowhere")


def test_check_compatible_names_the_first_differing_key():
    a = build_spec(_index(CRITEO.columns), FeatureConfig(hash_bits=20))
    b = build_spec(_index(CRITEO.columns), FeatureConfig(hash_bits=22))
    with pytest.raises(UserError, match=r"^feature spec mismatch: hash_bits 20 != 22; "):
        a.check_compatible(b)
    c = build_spec(_index(CRITEO.columns), FeatureConfig(seed=1))
    with pytest.raises(UserError, match=r"^feature spec mismatch: field C1 seed \d+ != \d+"):
        a.check_compatible(c)
    d = build_spec(_index(CRITEO.columns), FeatureConfig(min_count=2), kept_rows=np.arange(5))
    with pytest.raises(UserError, match=r"^feature spec mismatch: min_count 1 != 2"):
        a.check_compatible(d)
    # scoring data without a label column: the label name alone changes no id
    unlabeled = build_spec(
        _index({k: v for k, v in CRITEO.columns.items() if k != "label"}, label=None),
        FeatureConfig(hash_bits=20),
    )
    a.check_compatible(unlabeled)
