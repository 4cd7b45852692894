"""`ravfm serve` end to end: real HTTP requests to Serve apps on loopback (one local Ray and one
Serve instance for the module): answers equal `ravfm score` on the same rows, bad requests get
one line and the server keeps serving, concurrent requests are batched, and a rollout (reload
command, then a watched directory) under continuous traffic never fails a request."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from _serve_data import (
    columnar,
    criteo_rows,
    head_file,
    make_checkpoint,
    movielens_rows,
    shard_frame,
)

from ravfm.scorer import PREDICTION, PREDICTION_STD, Scorer

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
HISTORY = {"epochs": [{"epoch": 0, "train": {"logloss": 0.5}, "valid": {"auc": 0.7}}], "best": 0.7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:  # the Serve proxy's own answers (an unknown route) are plain text
            return e.code, {"text": text.decode(errors="replace")}


@pytest.fixture(scope="module")
def served(shared_data, tmp_path_factory):
    """Two apps on one Serve instance: criteo (FM, /criteo/, small body limit) serving step 1 of
    a run whose step 2 is on disk, and movielens (VFM with side features, /ml/)."""
    import ray
    from ray import serve

    from ravfm.config import FeatureConfig
    from ravfm.data.convert import convert
    from ravfm.data.index import read_index
    from ravfm.features.spec import build_spec
    from ravfm.features.stats import run_stats
    from ravfm.serve.config import ServeConfig
    from ravfm.serve.deploy import deploy

    tmp = tmp_path_factory.mktemp("serve")
    raw = head_file(shared_data / "criteo" / "dac_sample_8k.txt", tmp / "c.txt", 300)
    convert("criteo", str(raw), str(tmp / "criteo"), split="test")
    build_spec(read_index(tmp / "criteo"), FeatureConfig(hash_bits=12)).save(tmp / "spec-c")
    root = tmp / "runs" / "c" / "checkpoints"
    for step in (1, 2):
        make_checkpoint(root, step, tmp / "spec-c", seed=step, history=HISTORY)
    ml = shared_data / "movielens" / "ml-100k"
    convert("movielens", str(ml), str(tmp / "ml"), split="u1")
    run_stats(str(tmp / "ml"), str(tmp / "spec-ml"), FeatureConfig(hash_bits=12))
    ml_ckpt = make_checkpoint(tmp / "runs" / "m", 7, tmp / "spec-ml", "vfm", task="regression")
    # Behind HAProxy a removed replica drains for 30 s before it exits; 1 s here (the local
    # cluster's processes inherit this environment).
    drain = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
    saved, os.environ[drain] = os.environ.get(drain), "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    base = {"port": port, "cpus_per_replica": 0.25, "ready_timeout_s": 300.0}
    try:
        cfg = ServeConfig(
            checkpoint=str(root / "step-000000001"),
            name="criteo",
            route_prefix="/criteo/",
            max_body_mb=0.5,
            **base,
        )
        deploy(cfg)
        deploy(ServeConfig(checkpoint=str(ml_ckpt), name="movielens", route_prefix="/ml/", **base))
        yield SimpleNamespace(
            tmp=tmp,
            raw=raw,
            shards=tmp / "criteo",
            root=root,
            cfg=cfg,
            ml=(ml / "u1.test", tmp / "ml", ml_ckpt),
            url=f"http://127.0.0.1:{port}",
            gcs=ray.get_runtime_context().gcs_address,
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(drain) if saved is None else os.environ.update({drain: saved})


def test_answers_equal_ravfm_score_on_the_same_rows(served):
    from ravfm.scoring import score

    out = served.tmp / "scored"
    score(str(served.root / "step-000000001"), str(served.shards), str(out), keep=[])
    parts = sorted(out.glob("*.parquet"))
    want = np.concatenate([pq.read_table(f)[PREDICTION].to_numpy() for f in parts])
    rows = criteo_rows(served.raw)
    for body in (rows, columnar(rows)):
        status, got = _http(f"{served.url}/criteo/predict", json.dumps(body).encode())
        assert status == 200 and (got["model"], got["step"], got["rows"]) == ("serve_fm", 1, 300)
        np.testing.assert_allclose(got[PREDICTION], want, rtol=1e-5, atol=1e-6)
        assert PREDICTION_STD not in got


def test_movielens_vfm_looks_up_side_features_and_answers_the_std(served):
    src, shards, ckpt = served.ml
    rows = movielens_rows(src)[:500]
    status, got = _http(f"{served.url}/ml/predict", json.dumps(rows).encode())
    want = Scorer(str(ckpt))(shard_frame(shards).head(500).to_arrow())
    assert status == 200 and got["step"] == 7
    np.testing.assert_allclose(got[PREDICTION], want[PREDICTION].to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[PREDICTION_STD], want[PREDICTION_STD].to_numpy(), rtol=1e-4)
    unknown = [{"user_id": 99999, "item_id": 99999}]
    status, got = _http(f"{served.url}/ml/predict", json.dumps(unknown).encode())
    frame = shard_frame(shards).head(1)
    frame = frame.with_columns(
        pl.lit(99999, pl.Int64).alias("user_id"),
        pl.lit(99999, pl.Int64).alias("item_id"),
        *[
            pl.lit(None, frame.schema[c]).alias(c)
            for c in ("age", "gender", "occupation", "genres")
        ],
    )
    want = Scorer(str(ckpt))(frame.to_arrow())[PREDICTION].to_numpy()
    assert status == 200
    np.testing.assert_allclose(got[PREDICTION], want, rtol=1e-5)


def test_healthz_and_model_report_name_step_spec_and_metrics(served):
    from ravfm.features.spec import FeatureSpec

    assert _http(f"{served.url}/criteo/healthz") == (200, {"status": "ok", "step": 1})
    status, info = _http(f"{served.url}/criteo/model")
    spec = FeatureSpec.load(served.root / "step-000000001" / "spec")
    assert status == 200 and (info["name"], info["step"], info["spec"]) == (
        "serve_fm",
        1,
        spec.fingerprint,
    )
    assert info["metrics"] == {
        "epoch": 0,
        "train": {"logloss": 0.5},
        "valid": {"auc": 0.7},
        "best_valid": 0.7,
    }
    assert info["dataset"] == "criteo" and len(info["required_columns"]) == 39
    assert info["reload_error"] is None


ROW = {**{f"I{i}": None for i in range(1, 14)}, **{f"C{i}": None for i in range(1, 27)}}


@pytest.mark.parametrize(
    "body, method, path, status, fragment",
    [
        (b"nope", "POST", "predict", 400, "the body is not JSON"),
        (b"[]", "POST", "predict", 400, "holds no rows"),
        (json.dumps([{**ROW, "I99": 1}]).encode(), "POST", "predict", 400, "unknown column 'I99'"),
        (json.dumps([{"I1": 1}]).encode(), "POST", "predict", 400, "row 0 has no 'I2'"),
        (
            json.dumps([{**ROW, "I1": "one"}]).encode(),
            "POST",
            "predict",
            400,
            'I1 is "one", not an integer',
        ),
        (
            json.dumps([ROW] * 2000).encode(),
            "POST",
            "predict",
            413,
            "over the limit of 524,288 bytes",
        ),
        (None, "GET", "predict", 405, "predict takes POST"),
        (None, "GET", "nowhere", 404, "no route"),
    ],
)
def test_bad_requests_get_one_line_and_the_server_keeps_serving(
    served, body, method, path, status, fragment
):
    got_status, got = _http(f"{served.url}/criteo/{path}", body, method)
    assert got_status == status and fragment in got["error"] and "\n" not in got["error"]
    ok, answer = _http(f"{served.url}/criteo/predict", json.dumps([ROW]).encode())
    assert ok == 200 and len(answer[PREDICTION]) == 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(served):
    rows, table = criteo_rows(served.raw), shard_frame(served.shards).to_arrow()
    before = _http(f"{served.url}/criteo/model")[1]["served"]
    results, gate = {}, threading.Barrier(24)

    def one(i: int) -> None:
        gate.wait()
        results[i] = _http(
            f"{served.url}/criteo/predict", json.dumps(rows[i * 3 : i * 3 + 3]).encode()
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, got) in results.items():
        want = Scorer(str(served.root / f"step-{got['step']:09d}"))(table.slice(i * 3, 3))
        assert status == 200
        np.testing.assert_allclose(got[PREDICTION], want[PREDICTION].to_numpy(), rtol=1e-5)
    after = _http(f"{served.url}/criteo/model")[1]["served"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 24 and batches < requests  # several requests went through one model call


def _ravfm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-m", "ravfm", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )


def test_rollout_under_traffic_answers_old_or_new_and_never_fails(served):
    """`ravfm serve reload` (step 1 -> 2), then the watched directory (a new step 3 appears):
    two clients send requests all along; every answer is 200 and carries a step whose model
    computed its numbers; each client sees the steps in order."""
    from ravfm.serve.deploy import watch

    body = json.dumps(criteo_rows(served.raw)[:5]).encode()
    shards = shard_frame(served.shards).head(5).to_arrow()
    seen: list[list] = [[], []]
    stop = threading.Event()

    def client(log: list) -> None:
        while not stop.is_set():
            status, got = _http(f"{served.url}/criteo/predict", body)
            log.append((status, got.get("step"), got.get(PREDICTION)))

    clients = [threading.Thread(target=client, args=(log,)) for log in seen]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        done = _ravfm(
            "serve",
            "reload",
            "--address",
            served.gcs,
            "--name",
            "criteo",
            "--checkpoint",
            str(served.root / "step-000000002"),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "criteo now serves step 2" in done.stderr
        watched = dataclasses.replace(served.cfg, checkpoint=str(served.root), watch_s=0.5)
        stop_watch = threading.Event()
        watching = threading.Thread(
            target=watch, args=(watched, str(served.root / "step-000000002"), stop_watch)
        )
        watching.start()
        make_checkpoint(served.root, 3, served.tmp / "spec-c", seed=3, history=HISTORY)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(
            s == 3 for log in seen for _, s, _ in log[-3:]
        ):
            time.sleep(0.5)
        stop_watch.set()
        watching.join()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in clients:
            t.join()
    want = {
        s: Scorer(str(served.root / f"step-{s:09d}"))(shards)[PREDICTION].to_numpy()
        for s in (1, 2, 3)
    }
    for log in seen:
        assert log and all(status == 200 for status, _, _ in log), [
            x[:2] for x in log if x[0] != 200
        ][:3]
        steps = [s for _, s, _ in log]
        assert (
            steps == sorted(steps) and set(steps) <= {1, 2, 3} and steps[0] == 1 and steps[-1] == 3
        )
        for _, s, pred in log:
            np.testing.assert_allclose(pred, want[s], rtol=1e-5, atol=1e-6)


def test_cli_deploys_detached_to_a_cluster_and_stops(served):
    """`ravfm serve --address ... --detach` deploys another app beside the others and returns;
    `ravfm serve stop` removes it."""
    ckpt = served.root / "step-000000001"
    done = _ravfm(
        "serve",
        "--checkpoint",
        str(ckpt),
        "--address",
        served.gcs,
        "--detach",
        "--name",
        "cli",
        "serve.route_prefix=/cli/",
        "serve.cpus_per_replica=0.25",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cli serves step 1 (criteo" in done.stderr
    assert _http(f"{served.url}/cli/healthz") == (200, {"status": "ok", "step": 1})
    assert _http(f"{served.url}/criteo/healthz")[0] == 200  # the other apps are kept
    done = _ravfm("serve", "stop", "--address", served.gcs, "--name", "cli")
    assert done.returncode == 0 and "removed cli" in done.stderr, done.stderr[-2000:]
    deadline = time.monotonic() + 60  # the proxies drop the route shortly after the app
    while _http(f"{served.url}/cli/healthz")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _http(f"{served.url}/cli/healthz")[0] == 404
    assert _http(f"{served.url}/ml/healthz")[0] == 200


def test_the_python_proxy_ingress_gives_the_same_answers(served):
    """serve.ingress=proxy (Serve's Python proxy actor instead of HAProxy): the same answers.
    Runs last in the module: it restarts Serve."""
    from ray import serve

    from ravfm.serve.deploy import deploy

    serve.shutdown()
    port = _free_port()
    cfg = dataclasses.replace(
        served.cfg, ingress="proxy", port=port, checkpoint=str(served.root / "step-000000001")
    )
    deploy(cfg)
    rows = criteo_rows(served.raw)[:20]
    status, got = _http(f"http://127.0.0.1:{port}/criteo/predict", json.dumps(rows).encode())
    want = Scorer(cfg.checkpoint)(shard_frame(served.shards).head(20).to_arrow())[PREDICTION]
    assert status == 200 and got["step"] == 1
    np.testing.assert_allclose(got[PREDICTION], want.to_numpy(), rtol=1e-5, atol=1e-6)
    assert _http(f"http://127.0.0.1:{port}/criteo/predict", b"[]")[0] == 400
