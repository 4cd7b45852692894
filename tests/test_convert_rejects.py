"""Bad input is never dropped silently: each case is counted by reason and kept with its line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ravfm.data.convert as convert_mod
from ravfm.data.convert import convert
from ravfm.data.index import read_index
from ravfm.errors import UserError


def _rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _criteo_with_bad_lines(shared_data: Path, tmp_path: Path) -> tuple[Path, dict[int, tuple]]:
    good = (shared_data / "criteo" / "dac_sample_8k.txt").read_bytes().split(b"\n")[:2000]
    f = good[5].split(b"\t")
    bad = {
        101: (b"\t".join(f[:-1]), "bad_field_count"),  # 39 fields in a train file
        202: (b"\t".join(f + [b"x"]), "bad_field_count"),  # 41 fields
        303: (b"\t".join(f[:3] + [b"12a"] + f[4:]), "bad_int"),
        404: (b"\t".join([b"2"] + f[1:]), "bad_label"),
        505: (b"\t".join([b""] + f[1:]), "bad_label"),
        606: (b"\t".join(f[:20] + [b"\xff\xfe\x00a"] + f[21:]), "bad_utf8"),
        707: (b"", "bad_field_count"),  # a blank line
        1500: (b"\t".join(f[:10] + [b"3.5"] + f[11:]), "bad_int"),
        1600: (b"\t".join(f[:14] + [b"68fd1e6g"] + f[15:]), "bad_hex"),  # C1: not hex
        1700: (b"\t".join(f[:39] + [b"68fd1e6"]), "bad_hex"),  # C26: 7 digits
        1800: (b"\t".join(f[:20] + [b"-8fd1e64"] + f[21:]), "bad_hex"),  # C7: a sign
    }
    lines = []
    for i, line in enumerate(good, start=1):
        lines.append(bad[i][0] if i in bad else line)
    src = tmp_path / "dac.txt"
    src.write_bytes(b"\n".join(lines[:2000]) + b"\n")
    return src, bad


@pytest.mark.parametrize("block_bytes", [1 << 25, 40_000])
def test_criteo_bad_lines_are_counted_and_kept_with_line_numbers(
    shared_data, tmp_path, monkeypatch, block_bytes
):
    monkeypatch.setattr(convert_mod, "BLOCK_BYTES", block_bytes)  # many blocks: line bookkeeping
    src, bad = _criteo_with_bad_lines(shared_data, tmp_path)
    s = convert("criteo", str(src), tmp_path / "out", max_reject_rate=0.01)
    assert s["rejects"] == {
        "bad_field_count": 3,
        "bad_hex": 3,
        "bad_int": 2,
        "bad_label": 2,
        "bad_utf8": 1,
    }
    assert s["rows"] == 2000 - len(bad) and s["lines"] == 2000
    rej = _rejects(tmp_path / "out" / "_rejects" / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rej] == [(k, v[1]) for k, v in sorted(bad.items())]
    assert rej[0]["raw"] == bad[101][0].decode() and rej[0]["file"] == str(src)
    assert rej[5]["raw"].startswith(bad[606][0][:20].decode(errors="ignore")[:10])
    assert "\\xff\\xfe" in rej[5]["raw"]
    idx = read_index(tmp_path / "out")
    assert idx["rejected"] == 11 and idx["rejects_file"] == "_rejects/rejects.jsonl"


def test_reject_rate_above_the_limit_fails_and_leaves_no_dataset(shared_data, tmp_path):
    src, _ = _criteo_with_bad_lines(shared_data, tmp_path)
    with pytest.raises(UserError) as e:
        convert("criteo", str(src), tmp_path / "out")  # 11 / 2000 = 0.55% > 0.1%
    msg = str(e.value)
    assert "\n" not in msg
    assert "11 of 2000 lines rejected" in msg and "--max-reject-rate" in msg
    assert "bad_field_count 3" in msg and "bad_utf8 1" in msg
    assert not (tmp_path / "out").exists()
    kept = tmp_path / "out.rejects" / "rejects.jsonl"
    assert len(_rejects(kept)) == 11 and str(kept) in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dac.txt", "out.rejects"]


def test_failed_reconversion_leaves_the_existing_dataset_untouched(shared_data, tmp_path):
    src = tmp_path / "dac.txt"
    shutil.copy(shared_data / "criteo" / "dac_sample_8k.txt", src)
    out = tmp_path / "out"
    convert("criteo", str(src), out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    src.write_bytes(src.read_bytes() + b"1\tnot\tcriteo\n" * 50)
    with pytest.raises(UserError, match="50 of 8050 lines rejected"):
        convert("criteo", str(src), out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_avazu_bad_click_hour_and_field_count(shared_data, tmp_path):
    lines = (shared_data / "avazu" / "avazu_sample_9k.csv").read_bytes().split(b"\n")[:501]
    f = lines[3].split(b",")
    lines[10] = b",".join(f[:1] + [b"3"] + f[2:])  # click not 0/1
    lines[20] = b",".join(f[:2] + [b"14133100"] + f[3:])  # month 13
    lines[30] = b",".join(f[:2] + [b"14022900"] + f[3:])  # 2014-02-29 does not exist
    lines[40] = b",".join(f[:2] + [b"1410210x"] + f[3:])  # not an integer
    lines[50] = b",".join(f[:5])
    src = tmp_path / "a.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    s = convert("avazu", str(src), tmp_path / "out", max_reject_rate=1)
    assert s["rejects"] == {"bad_field_count": 1, "bad_hour": 3, "bad_label": 1}
    rej = _rejects(tmp_path / "out" / "_rejects" / "rejects.jsonl")
    assert [r["line"] for r in rej] == [11, 21, 31, 41, 51]  # the header is line 1
    assert s["rows"] == 495


def test_avazu_wrong_header_names_the_file(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text("id,label,when\n1,0,14102100\n")
    with pytest.raises(UserError, match="is not Avazu's"):
        convert("avazu", str(src), tmp_path / "out")


def test_libsvm_bad_labels_and_features(tmp_path):
    src = tmp_path / "x.libsvm"
    src.write_bytes(
        b"1 1:0.5 7:2\r\n-1 3:1\r\nabc 1:1\r\n1 2:x\r\n0 5\r\n1 -4:1\r\n"
        b"0.25\r\n1\t9:1  10:2\r\nnan 1:1\r\n1 2:\xff\r\n"
    )
    s = convert("libsvm", str(src), tmp_path / "out", max_reject_rate=1, split="train")
    assert s["rejects"] == {"bad_feature": 3, "bad_label": 2, "bad_utf8": 1}
    rej = _rejects(tmp_path / "out" / "_rejects" / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rej] == [
        (3, "bad_label"),
        (4, "bad_feature"),
        (5, "bad_feature"),
        (6, "bad_feature"),
        (9, "bad_label"),
        (10, "bad_utf8"),
    ]
    import polars as pl

    df = pl.read_parquet(tmp_path / "out" / "train-00000.parquet")
    assert df["label"].to_list() == [1.0, -1.0, 0.25, 1.0]
    assert df["idx"].to_list() == [[1, 7], [3], [], [9, 10]]
    assert df["val"].to_list() == [[0.5, 2.0], [1.0], [], [1.0, 2.0]]


def test_libffm_fields_and_mixed_pairs(tmp_path):
    src = tmp_path / "x.ffm"
    src.write_text("1 0:3:1 1:8:0.5\n0 2:4:1\n1 5:1\n")
    s = convert("libsvm", str(src), tmp_path / "out", max_reject_rate=1, split="train")
    assert s["variant"] == "libffm" and s["rejects"] == {"bad_feature": 1}
    import polars as pl

    df = pl.read_parquet(tmp_path / "out" / "train-00000.parquet")
    assert df["field"].to_list() == [[0, 1], [2]] and df["idx"].to_list() == [[3, 8], [4]]


def test_movielens_rating_out_of_range_is_rejected(shared_data, tmp_path):
    ml = tmp_path / "ml-100k"
    shutil.copytree(shared_data / "movielens" / "ml-100k", ml)
    with (ml / "u.data").open("ab") as f:
        f.write(b"1\t1\t7\t881250949\n1\tx\t3\t881250949\n")
    s = convert("movielens", str(ml), tmp_path / "out")
    assert s["rejects"] == {"bad_int": 1, "bad_label": 1} and s["rows"] == 100_000
    rej = _rejects(tmp_path / "out" / "_rejects" / "rejects.jsonl")
    assert [r["line"] for r in rej] == [100_001, 100_002]
    assert rej[0]["raw"] == "1\t1\t7\t881250949"
