"""`ravfm serve` without Ray: request rows parse to exactly the shard rows `convert` writes from
the same raw lines, bad requests are one line naming the row and column, MovieLens side tables,
served predictions equal the batch scorer's, and the serve config, CLI and submit entry."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from _serve_data import (
    avazu_rows,
    columnar,
    criteo_rows,
    head_file,
    make_checkpoint,
    movielens_rows,
    shard_frame,
)

from ravfm.errors import UserError
from ravfm.serve.layouts import BadRequest


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """Converted shards (one test split) of the first raw lines of each sample, and specs."""
    from ravfm.config import FeatureConfig
    from ravfm.data.convert import convert
    from ravfm.data.index import read_index
    from ravfm.features.spec import build_spec
    from ravfm.features.stats import run_stats

    tmp = tmp_path_factory.mktemp("serve_rows")
    raw = {
        "criteo": head_file(shared_data / "criteo" / "dac_sample_8k.txt", tmp / "c.txt", 400),
        "avazu": head_file(
            shared_data / "avazu" / "avazu_sample_9k.csv", tmp / "a.csv", 400, header=True
        ),
    }
    out = {}
    for name, src in raw.items():
        convert(name, str(src), str(tmp / name), split="test")
        spec_dir = tmp / f"spec-{name}"
        build_spec(read_index(tmp / name), FeatureConfig(hash_bits=12)).save(spec_dir)
        out[name] = (src, tmp / name, spec_dir)
    ml = shared_data / "movielens" / "ml-100k"
    convert("movielens", str(ml), str(tmp / "ml"), split="u1")
    run_stats(str(tmp / "ml"), str(tmp / "spec-ml"), FeatureConfig(hash_bits=12))
    out["movielens"] = (ml / "u1.test", tmp / "ml", tmp / "spec-ml")
    return out


def _reader(data, name):
    from ravfm.features.spec import FeatureSpec
    from ravfm.serve.rows import RequestReader

    _, _, spec_dir = data[name]
    return RequestReader(FeatureSpec.load(spec_dir), spec_dir)


_ROWS = {"criteo": criteo_rows, "avazu": avazu_rows, "movielens": movielens_rows}


@pytest.mark.parametrize("name", ["criteo", "avazu", "movielens"])
@pytest.mark.parametrize("shape", ["rows", "columnar"])
def test_request_rows_parse_to_the_rows_convert_writes(data, name, shape):
    src, shards, _ = data[name]
    rows = _ROWS[name](src)
    body = json.dumps(rows if shape == "rows" else columnar(rows)).encode()
    got = _reader(data, name).read(body)
    want = shard_frame(shards).drop("_row", "rating", "label", "click", strict=False)
    if name == "movielens":  # convert saw the real ratings; a request's rating is ignored
        assert got.height == want.height == 20_000
    assert got.select(want.columns).equals(want)


def test_criteo_accepts_integers_as_text_and_empty_fields_as_missing(data):
    reader = _reader(data, "criteo")
    row = criteo_rows(data["criteo"][0])[0]
    as_text = {k: "" if v is None else str(v) for k, v in row.items()}
    assert reader.read(json.dumps([as_text]).encode()).equals(
        reader.read(json.dumps([row]).encode())
    )


def test_unknown_movielens_ids_get_null_side_features(data):
    reader = _reader(data, "movielens")
    got = reader.read(json.dumps([{"user_id": 10**9, "item_id": 10**9}]).encode())
    assert got["user_id"].to_list() == [10**9]
    assert got.select("age", "gender", "occupation", "genres").row(0) == (None,) * 4


def test_side_tables_hold_every_split_and_no_labels(data):
    _, shards, spec_dir = data["movielens"]
    users, items = (
        pl.read_parquet(spec_dir / "users.parquet"),
        pl.read_parquet(spec_dir / "items.parquet"),
    )
    assert users.columns == ["user_id", "age", "gender", "occupation", "zip"]
    assert items.columns == ["item_id", "genres"]
    test_only = set(shard_frame(shards, "test")["item_id"]) - set(
        shard_frame(shards, "train")["item_id"]
    )
    assert test_only and test_only <= set(items["item_id"])
    assert users["user_id"].is_unique().all() and items["item_id"].is_unique().all()
    assert users.height == 943 and items.height == 1682


ROW0 = {**{f"I{i}": None for i in range(1, 14)}, **{f"C{i}": None for i in range(1, 27)}}


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "the body is not JSON"),
        (b'[{"I1": "\xff"}]', "the body is not JSON (not UTF-8)"),
        (b"[]", "holds no rows"),
        (b"{}", "holds no rows"),
        (b"5", "the body is an integer"),
        (json.dumps([ROW0, 3]), "row 1 is an integer, not an object"),
        (json.dumps([{**ROW0, "I14": 1}]), "unknown column 'I14'; criteo rows take I1..I13"),
        (json.dumps([{k: v for k, v in ROW0.items() if k != "C7"}]), "row 0 has no 'C7'"),
        (json.dumps({k: [None] for k in ROW0 if k != "I2"}), "no column 'I2'"),
        (json.dumps({**{k: [None] for k in ROW0}, "I1": [1, 2]}), "I2 has 1 value but I1 has 2"),
        (json.dumps({**{k: [None] for k in ROW0}, "I1": 5}), "column I1 is an integer, not a list"),
        (json.dumps([{**ROW0, "I3": 1.5}]), "row 0: I3 is 1.5, a number, not an integer"),
        (json.dumps([{**ROW0, "I3": True}]), "row 0: I3 is true, a boolean"),
        (json.dumps([ROW0, {**ROW0, "I3": "7x"}]), 'row 1: I3 is "7x", not an integer'),
        (json.dumps([{**ROW0, "I3": 10**30}]), "row 0: I3 is 1000000000000000000000000000000"),
        (json.dumps([{**ROW0, "C2": "xyz"}]), 'row 0: C2 is "xyz", not a code of 8 hex digits'),
        (json.dumps([{**ROW0, "C2": 12345678}]), "C2 is 12345678, an integer, not a code"),
        (json.dumps([{**ROW0, "C2": "a\tb"}]), "holds a tab that a raw criteo line cannot carry"),
        (json.dumps([{**ROW0, "C2": "a\nb"}]), "holds a line break"),
        (json.dumps([{**ROW0, "C2": "\ud800"}]), "unpaired surrogate"),
    ],
)
def test_bad_requests_are_one_line_naming_the_problem(data, body, fragment):
    body = body.encode() if isinstance(body, str) else body
    with pytest.raises(BadRequest) as e:
        _reader(data, "criteo").read(body)
    assert fragment in str(e.value) and "\n" not in str(e.value) and e.value.status == 400


@pytest.mark.parametrize(
    "name, row, fragment",
    [
        ("avazu", {"hour": 14103200}, "hour is 14103200, not a time YYMMDDHH"),
        ("avazu", {"hour": None}, "hour is null, not a time YYMMDDHH"),
        ("avazu", {"hour": 14102100, "C1": "1,2"}, "holds a comma"),
        ("avazu", {"hour": 14102100, "site_id": ["a"]}, 'site_id is ["a"], a list'),
        ("movielens", {"user_id": 1}, "row 0 has no 'item_id'"),
        (
            "movielens",
            {"user_id": 1, "item_id": 2, "age": 30},
            "unknown column 'age' (the server looks",
        ),
        ("movielens", {"user_id": "u1", "item_id": 2}, 'user_id is "u1", not an integer'),
    ],
)
def test_avazu_and_movielens_bad_values(data, name, row, fragment):
    reader = _reader(data, name)
    full = {c: None for c in reader.sent} if name == "avazu" else {}
    with pytest.raises(BadRequest, match=None) as e:
        reader.read(json.dumps([{**full, **row}]).encode())
    assert fragment in str(e.value), str(e.value)


def test_served_model_predicts_like_the_batch_scorer(data, tmp_path):
    """The per-request path (read + ServedModel.predict) against Scorer on the converted shards,
    the model code `ravfm score` runs in its actors; VFM's std included."""
    from ravfm.scorer import PREDICTION, PREDICTION_STD, Scorer
    from ravfm.serve.model import ServedModel

    for name, model_name, task in [("criteo", "fm", "binary"), ("movielens", "vfm", "regression")]:
        src, shards, spec_dir = data[name]
        ckpt = make_checkpoint(tmp_path / name, 3, spec_dir, model_name, task=task)
        served = ServedModel(ckpt)
        got = served.predict(served.read(json.dumps(_ROWS[name](src)).encode()))
        want = Scorer(str(ckpt))(shard_frame(shards).to_arrow())
        np.testing.assert_allclose(
            got[PREDICTION], want[PREDICTION].to_numpy(), rtol=1e-5, atol=1e-6
        )
        if model_name == "vfm":
            np.testing.assert_allclose(
                got[PREDICTION_STD], want[PREDICTION_STD].to_numpy(), rtol=1e-4, atol=1e-7
            )
        assert served.info["step"] == 3 and served.info["spec"] == served.spec.fingerprint


def test_libsvm_checkpoints_are_refused_in_one_line(tmp_path):
    from ravfm.features.spec import FeatureSpec, FieldSpec
    from ravfm.serve.rows import RequestReader

    f = FieldSpec("idx", "multi", "List(Int64)", "splitmix64", 1, 1, 16, 17, width=4)
    spec = FeatureSpec("libsvm", "label", "binary", (f,), 4, "shared", 1)
    with pytest.raises(UserError, match="ravfm serve takes criteo, avazu and movielens"):
        RequestReader(spec, tmp_path)


def test_requests_parsed_together_keep_their_rows_and_their_own_errors(data):
    """parse_many (a serve.batch of requests): one parser call; a request with a line the
    parser rejects gets its own error (its row counted from 0), the others their own rows."""
    reader = _reader(data, "criteo")
    rows = criteo_rows(data["criteo"][0])
    bad = [rows[5], {**rows[6], "C4": "notahex!"}]
    bodies = [rows[:3], bad, rows[3:5], [rows[7]]]
    requests = [reader.prepare(json.dumps(b).encode()) for b in bodies]
    frame, errors, counts = reader.parse_many(requests)
    assert counts == [3, 0, 2, 1] and errors[0] is errors[2] is errors[3] is None
    assert 'row 1: C4 is "notahex!", not a code of 8 hex digits' in str(errors[1])
    alone = [reader.read(json.dumps(b).encode()) for b in (rows[:3], rows[3:5], [rows[7]])]
    assert frame.equals(pl.concat(alone))
