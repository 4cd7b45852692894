"""convert on the real samples: row counts, schema, nulls, splits, the index, re-runs, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ravfm.cli import main
from ravfm.data.convert import convert
from ravfm.data.index import FORMAT_VERSION, INDEX_NAME, read_index, split_paths
from ravfm.data.parse import pl_schema
from ravfm.data.schemas import AVAZU, CRITEO, LIBSVM, ROW_COLUMN
from ravfm.data.shards import ShardSet
from ravfm.data.split import hash_split
from ravfm.errors import UserError


def _read(out: Path, split: str | None = None) -> pl.DataFrame:
    splits = [split] if split else ["train", "valid", "test"]
    paths = [p for s in splits for p in split_paths(out, s)]
    return pl.concat([pl.read_parquet(p) for p in paths])


def _raw_fields(path: Path, sep: str, skip: int = 0) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[skip:]
    return [line.split(sep) for line in lines]


def _splitmix64_slow(x: int) -> int:
    m = (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_hash_split_matches_its_definition_row_by_row():
    rows, seed, ratios = np.arange(2000), 7, (8.0, 1.0, 1.0)
    fast = hash_split(rows, seed, ratios)
    for r in rows[:300]:
        z = (int(r) + seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64
        u = (_splitmix64_slow(z) >> 11) / 2**53
        assert fast[r] == (0 if u < 0.8 else 1 if u < 0.9 else 2)
    counts = np.bincount(fast, minlength=3) / len(rows)
    assert abs(counts[0] - 0.8) < 0.03 and abs(counts[1] - 0.1) < 0.02


def test_criteo_sample_keeps_schema_nulls_and_hash_splits(shared_data, tmp_path):
    src = shared_data / "criteo" / "dac_sample_8k.txt"
    s = convert("criteo", str(src), tmp_path / "out")
    out = tmp_path / "out"
    idx = read_index(out)
    assert s["rows"] == idx["rows"] == 8000 and s["rejected"] == 0 and not s["skipped"]
    assert idx["format_version"] == FORMAT_VERSION and idx["dataset"] == "criteo"
    assert idx["variant"] == "train" and idx["label"] == "label"
    assert idx["schema"] == {**CRITEO.columns, ROW_COLUMN: "Int64"}
    assert idx["source"]["files"][0]["size"] == src.stat().st_size
    assert "mtime" in idx["source"]["files"][0]
    want = np.bincount(hash_split(np.arange(8000), 0, (8, 1, 1)), minlength=3)
    assert [idx["splits"][k]["rows"] for k in ("train", "valid", "test")] == want.tolist()
    df = _read(out)
    assert dict(df.schema) == pl_schema({**CRITEO.columns, ROW_COLUMN: "Int64"})
    raw = _raw_fields(src, "\t")
    for j, col in enumerate(CRITEO.columns):
        assert df[col].null_count() == sum(f[j] == "" for f in raw), col
    assert df["label"].sum() == sum(int(f[0]) for f in raw)
    assert sorted(df["I5"].drop_nulls().to_list()) == sorted(int(f[5]) for f in raw if f[5])
    c7 = df.sort(ROW_COLUMN)["C7"].to_list()  # UInt32 codes give the hex text back exactly
    assert [None if v is None else f"{v:08x}" for v in c7] == [f[20] or None for f in raw]
    meta = pq.ParquetFile(split_paths(out, "train")[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_avazu_sample_derives_hour_of_day_and_weekday(shared_data, tmp_path):
    src = shared_data / "avazu" / "avazu_sample_9k.csv"
    s = convert("avazu", str(src), tmp_path / "out")
    assert s["rows"] == 8999 and s["rejected"] == 0
    df = _read(tmp_path / "out")
    assert dict(df.schema) == pl_schema({**AVAZU.columns, ROW_COLUMN: "Int64"})
    assert df["hour"].unique().to_list() == [14102100]
    assert df["hour_of_day"].unique().to_list() == [0]
    assert df["weekday"].unique().to_list() == [1]  # 2014-10-21 was a Tuesday (Monday = 0)
    raw = _raw_fields(src, ",", skip=1)
    assert df["click"].sum() == sum(int(f[1]) for f in raw)
    assert sorted(df["id"].to_list()) == sorted(f[0] for f in raw)
    assert df.null_count().sum_horizontal().item() == 0


def test_movielens_100k_joins_user_and_genre_side_features(shared_data, tmp_path):
    s = convert("movielens", str(shared_data / "movielens" / "ml-100k"), tmp_path / "out")
    assert s["rows"] == 100_000 and s["variant"] == "ml-100k" and s["rejected"] == 0
    df = _read(tmp_path / "out")
    assert df["user_id"].n_unique() == 943 and df["item_id"].n_unique() == 1682
    assert (
        df.select("age", "gender", "occupation", "zip", "genres")
        .null_count()
        .sum_horizontal()
        .item()
        == 0
    )
    toy = df.filter(pl.col("item_id") == 1)["genres"][0].to_list()
    assert toy == ["Animation", "Children's", "Comedy"]
    u1 = df.filter(pl.col("user_id") == 1).row(0, named=True)
    assert (u1["age"], u1["gender"], u1["occupation"], u1["zip"]) == (
        24,
        "M",
        "technician",
        "85711",
    )
    assert df["rating"].is_between(1, 5).all() and df["rating"].dtype == pl.Float32


def test_movielens_u1_standard_split_uses_base_and_test_files(shared_data, tmp_path):
    ml = shared_data / "movielens" / "ml-100k"
    convert("movielens", str(ml), tmp_path / "out", split="u1")
    idx = read_index(tmp_path / "out")
    assert idx["split_rule"]["kind"] == "standard" and idx["split_rule"]["name"] == "u1"
    assert {k: v["rows"] for k, v in idx["splits"].items()} == {
        "train": 80000,
        "valid": 0,
        "test": 20000,
    }
    assert split_paths(tmp_path / "out", "valid") == []
    test = _read(tmp_path / "out", "test")
    first = (ml / "u1.test").read_text().split("\n", 1)[0].split("\t")
    assert test.row(0)[:4] == (int(first[0]), int(first[1]), float(first[2]), int(first[3]))


def test_frappe_libfm_with_crlf_keeps_labels_and_features(shared_data, tmp_path):
    src = shared_data / "frappe" / "frappe.validation.libfm"
    s = convert("libsvm", str(src), tmp_path / "out", split="train")
    assert s["rows"] == 57722 and s["variant"] == "libsvm" and s["splits"]["train"] == 57722
    df = _read(tmp_path / "out", "train")
    assert dict(df.schema) == pl_schema({**LIBSVM.columns, ROW_COLUMN: "Int64"})
    assert set(df["label"].unique().to_list()) == {-1.0, 1.0}
    assert df["idx"].list.len().unique().to_list() == [10]  # 10 fields, one value each
    assert df["field"].null_count() == len(df)
    first = src.read_bytes().split(b"\r\n", 1)[0].decode().split()
    assert df["label"][0] == float(first[0])
    assert df["idx"][0].to_list() == [int(t.split(":")[0]) for t in first[1:]]
    assert df["val"][0].to_list() == [1.0] * 10


def test_shards_roll_at_rows_per_shard_with_fixed_row_groups(tmp_path):
    cols = {"a": "Int64", "s": "String"}
    shards = ShardSet(tmp_path, cols, rows_per_shard=250, row_group_rows=100)
    start = 0
    for n in (7, 130, 90, 333, 1, 39):  # 600 rows in odd pieces
        shards.add("train", pl.DataFrame({"a": np.arange(start, start + n), "s": ["x"] * n}))
        start += n
    out = shards.close()
    assert [s["rows"] for s in out] == [250, 250, 100]
    groups = [
        [
            pq.ParquetFile(tmp_path / s["path"]).metadata.row_group(i).num_rows
            for i in range(pq.ParquetFile(tmp_path / s["path"]).num_row_groups)
        ]
        for s in out
    ]
    assert groups == [[100, 100, 50], [100, 100, 50], [100]]
    back = pl.concat([pl.read_parquet(tmp_path / s["path"]) for s in out])
    assert back["a"].to_list() == list(range(600))


def test_rows_per_shard_makes_several_shards_per_split(shared_data, tmp_path):
    src = shared_data / "criteo" / "dac_sample_8k.txt"
    convert("criteo", str(src), tmp_path / "out", rows_per_shard=1000)
    idx = read_index(tmp_path / "out")
    assert idx["splits"]["train"]["shards"] == 7
    assert all(s["rows"] <= 1000 for s in idx["shards"])
    assert sum(s["rows"] for s in idx["shards"]) == 8000


def test_reconvert_skips_same_source_and_replaces_changed_one(shared_data, tmp_path):
    src = tmp_path / "dac.txt"
    shutil.copy(shared_data / "criteo" / "dac_sample_8k.txt", src)
    out = tmp_path / "out"
    assert not convert("criteo", str(src), out)["skipped"]
    again = convert("criteo", str(src), out)
    assert again["skipped"] and again["rows"] == 8000
    with src.open("ab") as f:
        f.write(src.read_bytes().split(b"\n", 1)[0] + b"\n")
    replaced = convert("criteo", str(src), out)
    assert not replaced["skipped"] and read_index(out)["rows"] == 8001
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dac.txt", "out"]  # no temp dirs left


def test_out_holding_another_dataset_or_foreign_files_is_refused(shared_data, tmp_path):
    out = tmp_path / "out"
    convert("criteo", str(shared_data / "criteo" / "dac_sample_8k.txt"), out)
    with pytest.raises(UserError, match="already holds a different dataset"):
        convert("avazu", str(shared_data / "avazu" / "avazu_sample_9k.csv"), out)
    assert read_index(out)["dataset"] == "criteo"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a ravfm dataset"):
        convert("criteo", str(shared_data / "criteo" / "dac_sample_8k.txt"), foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_read_index_refuses_unknown_format_version_and_split(shared_data, tmp_path):
    out = tmp_path / "out"
    convert("avazu", str(shared_data / "avazu" / "avazu_sample_9k.csv"), out)
    with pytest.raises(UserError, match="no split 'dev'"):
        split_paths(out, "dev")
    paths = split_paths(out, "train")
    assert paths and all(Path(p).is_absolute() and Path(p).exists() for p in paths)
    idx = json.loads((out / INDEX_NAME).read_text())
    idx["format_version"] = 99
    (out / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(UserError, match="format_version 99 is not supported"):
        read_index(out)
    with pytest.raises(UserError, match="no _index.json"):
        read_index(tmp_path)


def test_missing_empty_and_unknown_sources_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        convert("criteo", str(tmp_path / "nope.txt"), tmp_path / "out")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        convert("criteo", str(tmp_path / "empty.txt"), tmp_path / "out")
    with pytest.raises(UserError, match="unknown format 'parquet'"):
        convert("parquet", str(tmp_path / "empty.txt"), tmp_path / "out")
    with pytest.raises(UserError, match="--split 'u1' is not valid for criteo"):
        convert("criteo", str(tmp_path / "empty.txt"), tmp_path / "out", split="u1")
    assert not (tmp_path / "out").exists()


def test_cli_convert_missing_source_exits_2_with_one_line(tmp_path, capsys):
    code = main(["convert", "criteo", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ravfm convert: error: ")
    assert "missing.txt" in err and "Traceback" not in err


def test_cli_convert_prints_one_summary_line(shared_data, tmp_path, capsys):
    src = shared_data / "avazu" / "avazu_sample_9k.csv"
    assert main(["convert", "avazu", str(src), "--out", str(tmp_path / "o"), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "8,999 rows" in out and "rows/s" in out and "rejects 0" in out
    assert read_index(tmp_path / "o")["split_rule"]["seed"] == 3


def test_criteo_test_file_without_label_is_the_test_variant(shared_data, tmp_path):
    lines = (shared_data / "criteo" / "dac_sample_8k.txt").read_bytes().split(b"\n")[:500]
    src = tmp_path / "test.txt"
    src.write_bytes(b"\n".join(line.split(b"\t", 1)[1] for line in lines) + b"\n")
    s = convert("criteo", str(src), tmp_path / "out", split="test")
    idx = read_index(tmp_path / "out")
    assert s["variant"] == "test" and idx["label"] is None and "label" not in idx["schema"]
    df = _read(tmp_path / "out", "test")
    assert (
        df.columns == [c for c in CRITEO.columns if c != "label"] + [ROW_COLUMN] and len(df) == 500
    )
    with pytest.raises(UserError, match="looks like criteo test, not the --variant train"):
        convert("criteo", str(src), tmp_path / "out2", variant="train")


def test_avazu_test_file_without_click_is_the_test_variant(shared_data, tmp_path):
    lines = (shared_data / "avazu" / "avazu_sample_9k.csv").read_text().splitlines()[:300]
    src = tmp_path / "test.csv"
    src.write_text("\n".join(",".join(f[:1] + f[2:]) for f in (x.split(",") for x in lines)) + "\n")
    s = convert("avazu", str(src), tmp_path / "out")
    assert s["variant"] == "test" and s["rows"] == 299
    assert "click" not in _read(tmp_path / "out").columns


def test_mostly_bad_input_stops_early_with_a_clear_error(shared_data, tmp_path, monkeypatch):
    import ravfm.data.convert as convert_mod

    monkeypatch.setattr(convert_mod, "BLOCK_BYTES", 1 << 16)
    good = (shared_data / "criteo" / "dac_sample_8k.txt").read_bytes().split(b"\n")[0]
    src = tmp_path / "bad.txt"
    src.write_bytes(good + b"\n" + b"1\tnot criteo at all\n" * 50_000)
    with pytest.raises(UserError, match="lines read rejected") as e:
        convert("criteo", str(src), tmp_path / "out")
    bad, read = (int(x) for x in str(e.value).split(": ", 1)[1].split(" lines")[0].split(" of "))
    assert read < 20_000 and bad == read - 1 and "bad_field_count" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_nothing_behind(shared_data, tmp_path, monkeypatch):
    def boom(self, split, df):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardSet, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        convert("criteo", str(shared_data / "criteo" / "dac_sample_8k.txt"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_shards_read_back_as_plain_arrow_types_for_any_reader(shared_data, tmp_path):
    convert("movielens", str(shared_data / "movielens" / "ml-100k"), tmp_path / "out")
    schema = pq.read_schema(split_paths(tmp_path / "out", "train")[0])
    assert str(schema.field("gender").type) == "string"  # not string_view
    assert str(schema.field("genres").type) == "list<element: string>"  # not large_list
    assert str(schema.field("age").type) == "int16" and str(schema.field("rating").type) == "float"


def test_every_shard_row_lands_in_the_split_its_row_number_hashes_to(shared_data, tmp_path):
    convert("avazu", str(shared_data / "avazu" / "avazu_sample_9k.csv"), tmp_path / "out", seed=11)
    rows = []
    for k, split in enumerate(("train", "valid", "test")):
        r = _read(tmp_path / "out", split)[ROW_COLUMN].to_numpy()
        assert (hash_split(r, 11, (8, 1, 1)) == k).all()
        rows.append(r)
    assert sorted(np.concatenate(rows).tolist()) == list(range(8999))


def test_a_failing_shard_writer_fails_the_conversion_and_leaves_nothing(
    shared_data, tmp_path, monkeypatch
):
    import ravfm.data.shards as shards

    out = tmp_path / "out"
    src = shared_data / "criteo" / "dac_sample_8k.txt"

    def disk_full(self, table):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards._SplitWriter, "_write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert("criteo", str(src), out, rows_per_shard=1000)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary directory is gone too


@pytest.mark.parametrize("split", ["hash", "test"])
def test_criteo_routed_in_the_parser_equals_parse_then_route(
    split, shared_data, tmp_path, monkeypatch
):
    """Blocks the compiled parser routes itself and blocks that go parse -> route give the same
    shards, row numbers and order; small blocks so several of each kind mix in one run."""
    import ravfm.data.convert as conv
    from ravfm.data.formats import Criteo

    src = shared_data / "criteo" / "dac_sample_8k.txt"
    monkeypatch.setattr(conv, "BLOCK_BYTES", 64 << 10)
    convert("criteo", str(src), tmp_path / "routed", split=split, seed=3, rows_per_shard=3000)
    routed = Criteo.parse_routed
    monkeypatch.setattr(Criteo, "parse_routed", lambda self, b, **kw: None)
    convert("criteo", str(src), tmp_path / "general", split=split, seed=3, rows_per_shard=3000)
    calls = []
    monkeypatch.setattr(  # every other block declines: both kinds in one conversion
        Criteo,
        "parse_routed",
        lambda self, b, **kw: (
            calls.append(1) or (None if len(calls) % 2 else routed(self, b, **kw))
        ),
    )
    convert("criteo", str(src), tmp_path / "mixed", split=split, seed=3, rows_per_shard=3000)
    assert len(calls) > 4
    for name in ("routed", "mixed"):
        for s in ("train", "valid", "test"):
            got, want = split_paths(tmp_path / name, s), split_paths(tmp_path / "general", s)
            assert [Path(p).name for p in got] == [Path(p).name for p in want]
            for a, b in zip(got, want, strict=True):
                assert pq.read_table(a).equals(pq.read_table(b)), (name, s, a)


def test_convert_hands_frozen_objects_back_to_the_collector(shared_data, tmp_path):
    import gc

    src = str(shared_data / "criteo" / "dac_sample_8k.txt")
    convert("criteo", src, tmp_path / "a")
    assert gc.get_freeze_count() == 0  # what it froze for the run is unfrozen
    gc.freeze()  # a caller's own freeze (e.g. before forking) is left alone
    try:
        frozen = gc.get_freeze_count()
        convert("criteo", src, tmp_path / "b")
        assert gc.get_freeze_count() > frozen // 2  # still frozen (a few freed by refcount)
    finally:
        gc.unfreeze()
