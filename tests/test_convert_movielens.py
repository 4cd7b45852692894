"""MovieLens layouts beyond ml-100k, on tiny hand-written files in each release's format."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import ravfm.data.convert as convert_mod
from ravfm.data.convert import convert
from ravfm.data.index import read_index, split_paths
from ravfm.errors import UserError


def _all(out: Path) -> pl.DataFrame:
    paths = [p for s in ("train", "valid", "test") for p in split_paths(out, s)]
    return pl.concat([pl.read_parquet(p) for p in paths]).sort("user_id", "item_id")


def _ml1m(root: Path) -> Path:
    d = root / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n2::3408::4::978300275\n"
    )
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3408::Erin Brockovich (2000)::Drama\n"
        "9::Misérables, Les (1995)::Drama|Musical\n".encode("latin-1")
    )
    return d


def test_ml1m_joins_users_and_movies_with_double_colon_separators(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "BLOCK_BYTES", 7)  # `::` split across reads
    s = convert("movielens", str(_ml1m(tmp_path)), tmp_path / "out", split="train")
    assert s["variant"] == "ml-1m" and s["rows"] == 4 and s["rejected"] == 0
    df = _all(tmp_path / "out")
    assert df.columns == [
        "user_id",
        "item_id",
        "rating",
        "timestamp",
        "age",
        "gender",
        "occupation",
        "zip",
        "genres",
        "_row",
    ]
    row = df.row(0, named=True)
    assert (row["user_id"], row["item_id"], row["rating"], row["timestamp"]) == (
        1,
        661,
        3.0,
        978302109,
    )
    assert (row["age"], row["gender"], row["occupation"], row["zip"]) == (1, "F", "10", "48067")
    assert row["genres"] == ["Animation", "Children's", "Musical"]


def test_ml10m_has_half_stars_and_no_user_features(tmp_path):
    d = tmp_path / "ml-10M100K"
    d.mkdir()
    (d / "ratings.dat").write_text(
        "1::122::5::838985046\n1::185::4.5::838983525\n2::122::0.5::8\n3::9::6::9\n"
    )
    (d / "movies.dat").write_text(
        "122::Boomerang (1992)::Comedy|Romance\n185::Net, The (1995)::Action|Crime|Thriller\n"
    )
    s = convert("movielens", str(d), tmp_path / "out", split="train", max_reject_rate=0.5)
    assert s["variant"] == "ml-10m" and s["rows"] == 3 and s["rejects"] == {"bad_label": 1}
    df = _all(tmp_path / "out")
    assert "age" not in df.columns and df["rating"].to_list() == [5.0, 4.5, 0.5]
    assert df["genres"].to_list() == [
        ["Comedy", "Romance"],
        ["Action", "Crime", "Thriller"],
        ["Comedy", "Romance"],
    ]
    raw = (tmp_path / "out" / "_rejects" / "rejects.jsonl").read_text()
    assert '"raw": "3::9::6::9"' in raw and '"line": 4' in raw


def test_ml25m_csv_layout_with_quoted_titles_and_no_genres(tmp_path):
    d = tmp_path / "ml-25m"
    d.mkdir()
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n2,296,4.0,1\n"
    )
    (d / "movies.csv").write_text(
        'movieId,title,genres\n296,"Pulp Fiction, the (1994)",Comedy|Crime\n306,Three Colors: Red (1994),(no genres listed)\n'
    )
    s = convert("movielens", str(d), tmp_path / "out", split="train")
    assert s["variant"] == "ml-25m" and s["rows"] == 3
    df = _all(tmp_path / "out")
    assert df["genres"].to_list() == [["Comedy", "Crime"], [], ["Comedy", "Crime"]]
    assert read_index(tmp_path / "out")["schema"] == {
        "user_id": "Int64",
        "item_id": "Int64",
        "rating": "Float32",
        "timestamp": "Int64",
        "genres": "List(String)",
        "_row": "Int64",
    }


def test_movielens_errors_name_the_problem(tmp_path, shared_data):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty-dir" / "README").write_text("x")
    with pytest.raises(UserError, match="no u.data, ratings.dat or ratings.csv"):
        convert("movielens", str(tmp_path / "empty-dir"), tmp_path / "out")
    with pytest.raises(UserError, match="standard split; .* is ml-1m: use --split hash"):
        convert("movielens", str(_ml1m(tmp_path)), tmp_path / "out", split="u1")
    with pytest.raises(UserError, match="not the --variant ml-1m"):
        convert(
            "movielens",
            str(shared_data / "movielens" / "ml-100k"),
            tmp_path / "out",
            variant="ml-1m",
        )
