"""Sources: compressed streams, archives, globs, http:// from a loopback server, s3:// on moto."""

from __future__ import annotations

import bz2
import functools
import gzip
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import polars as pl
import pytest

from ravfm.data.convert import convert
from ravfm.data.index import read_index, split_paths
from ravfm.data.sources import iter_blocks
from ravfm.errors import UserError


def _labels(out: Path) -> list[int]:
    paths = [p for s in ("train", "valid", "test") for p in split_paths(out, s)]
    return pl.concat([pl.read_parquet(p) for p in paths])["label"].to_list()


@pytest.fixture(scope="module")
def criteo_raw(shared_data) -> bytes:
    return (shared_data / "criteo" / "dac_sample_8k.txt").read_bytes()


@pytest.fixture(scope="module")
def plain_labels(criteo_raw, tmp_path_factory) -> list[int]:
    d = tmp_path_factory.mktemp("plain")
    (d / "dac.txt").write_bytes(criteo_raw)
    convert("criteo", str(d / "dac.txt"), d / "out")
    return _labels(d / "out")


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _zip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("dac.txt", data)
    return buf.getvalue()


def _targz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("train/dac.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, pack",
    [
        ("dac.txt.gz", gzip.compress),
        ("dac.txt.bz2", bz2.compress),
        ("dac.txt.zst", _zst),
        ("dac.zip", _zip),
        ("dac.tar.gz", _targz),
    ],
)
def test_compressed_sources_stream_to_the_same_rows(criteo_raw, plain_labels, tmp_path, name, pack):
    src = tmp_path / name
    src.write_bytes(pack(criteo_raw))
    s = convert("criteo", str(src), tmp_path / "out")
    assert s["rows"] == 8000 and s["rejected"] == 0
    assert _labels(tmp_path / "out") == plain_labels
    assert not [p for p in tmp_path.iterdir() if p.name not in (name, "out")]  # nothing unpacked


def test_truncated_gzip_is_a_user_error(criteo_raw, tmp_path):
    src = tmp_path / "dac.txt.gz"
    src.write_bytes(gzip.compress(criteo_raw)[:50_000])
    with pytest.raises(UserError, match="truncated or not in the compression"):
        convert("criteo", str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_glob_reads_files_in_order_with_their_own_line_numbers(criteo_raw, tmp_path):
    lines = criteo_raw.split(b"\n")
    (tmp_path / "part-0.txt").write_bytes(b"\n".join(lines[:3000]) + b"\n")
    (tmp_path / "part-1.txt").write_bytes(b"\n".join(lines[3000:8000] + [b"1\t2"]) + b"\n")
    s = convert("criteo", str(tmp_path / "part-*.txt"), tmp_path / "out", max_reject_rate=0.01)
    assert s["rows"] == 8000 and s["lines"] == 8001
    idx = read_index(tmp_path / "out")
    assert [f["url"] for f in idx["source"]["files"]] == [
        str(tmp_path / f"part-{i}.txt") for i in (0, 1)
    ]
    rej = (tmp_path / "out" / "_rejects" / "rejects.jsonl").read_text()
    assert '"line": 5001' in rej and "part-1.txt" in rej


def test_iter_blocks_cuts_after_newlines_and_ends_unterminated_input():
    data = b"a\nbb\nccc\ndddd"
    blocks = list(iter_blocks(io.BytesIO(data), 3))
    assert all(b.endswith(b"\n") for b in blocks)
    assert b"".join(blocks) == data + b"\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_source_from_a_loopback_server(criteo_raw, plain_labels, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    (served / "dac.txt.gz").write_bytes(gzip.compress(criteo_raw))
    handler = functools.partial(_QuietHandler, directory=str(served))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/dac.txt.gz"
        s = convert("criteo", url, tmp_path / "out")
        assert s["rows"] == 8000
        assert _labels(tmp_path / "out") == plain_labels
        assert read_index(tmp_path / "out")["source"]["url"] == url
        with pytest.raises(UserError, match="no such file"):
            convert("criteo", url.replace("dac", "nope"), tmp_path / "out2")
    finally:
        srv.shutdown()
        srv.server_close()


def test_s3_source_from_a_moto_server(criteo_raw, plain_labels, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec.config
    import s3fs

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        monkeypatch.setitem(
            fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        )
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("ravfm-test")
        fs.pipe("ravfm-test/criteo/dac.txt.gz", gzip.compress(criteo_raw))
        s = convert("criteo", "s3://ravfm-test/criteo/dac.txt.gz", tmp_path / "out")
        assert s["rows"] == 8000
        assert _labels(tmp_path / "out") == plain_labels
        f = read_index(tmp_path / "out")["source"]["files"][0]
        assert f["url"] == "s3://ravfm-test/criteo/dac.txt.gz" and f["etag"]
        again = convert("criteo", "s3://ravfm-test/criteo/dac.txt.gz", tmp_path / "out")
        assert again["skipped"]  # same etag and size: up to date
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        srv.stop()


def test_movielens_from_a_zip_archive(shared_data, tmp_path):
    ml = shared_data / "movielens" / "ml-100k"
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("u.data", "u.user", "u.item", "u.genre", "u1.base", "u1.test"):
            z.write(ml / name, f"ml-100k/{name}")
    s = convert("movielens", str(tmp_path / "ml-100k.zip"), tmp_path / "out", split="u1")
    assert s["variant"] == "ml-100k" and s["splits"] == {"train": 80000, "valid": 0, "test": 20000}


def test_a_file_that_is_not_the_archive_its_name_says_is_a_user_error(criteo_raw, tmp_path):
    (tmp_path / "dac.zip").write_bytes(criteo_raw[:5000])
    with pytest.raises(UserError, match="is it the archive or compression its name says"):
        convert("criteo", str(tmp_path / "dac.zip"), tmp_path / "out")
    (tmp_path / "dac.txt.zst").write_bytes(criteo_raw[:5000])
    with pytest.raises(UserError, match="truncated or not in the compression"):
        convert("criteo", str(tmp_path / "dac.txt.zst"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
