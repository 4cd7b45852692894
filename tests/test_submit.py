"""ravfm.submit without a cluster: address and token resolution, error lines, the submit flow.

The auth errors are produced by the real JobSubmissionClient talking to a tiny fake dashboard
that answers like Ray's token middleware (401 without a token, 403 with a wrong one).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from ravfm import submit as sub
from ravfm.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "jobs" / "smoke.yaml")
GOOD = "good-token-0123"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No address, no token anywhere (HOME is a fresh directory)."""
    for k in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        "RAY_RUNTIME_ENV_IGNORE_GITIGNORE",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TokenDashboard(BaseHTTPRequestHandler):
    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        auth = self.headers.get("Authorization", "")
        if not auth:
            return self._reply(401, "Unauthorized: Missing authentication token")
        if auth != f"Bearer {GOOD}":
            return self._reply(403, "Forbidden: Invalid authentication token")
        self._reply(200, json.dumps({"ray_version": "2.60.0", "version": "2.60.0"}))

    do_POST = do_PUT = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def token_dashboard():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenDashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_address_says_what_to_pass(clean_env):
    with pytest.raises(UserError) as e:
        sub.submit(SMOKE, address=None, overrides=[])
    assert "--address http://HEAD:8265" in _one_line(e) and "RAY_ADDRESS" in str(e.value)


def test_bad_config_fails_before_contacting_the_cluster(clean_env):
    with pytest.raises(UserError) as e:
        sub.submit(SMOKE, address=f"http://127.0.0.1:{_free_port()}", overrides=["model.k=0"])
    assert "model.k" in _one_line(e)


def test_missing_token_on_a_token_cluster_says_how_to_get_one(clean_env, token_dashboard):
    with pytest.raises(UserError) as e:
        sub.submit(SMOKE, address=token_dashboard, overrides=[])
    msg = _one_line(e)
    assert "requires an authentication token" in msg and token_dashboard in msg
    assert "ray get-auth-token" in msg and "RAY_AUTH_TOKEN" in msg


def test_wrong_token_names_where_it_came_from(clean_env, token_dashboard, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(UserError) as e:
        sub.submit(SMOKE, address=token_dashboard, overrides=[])
    assert "rejected the token from RAY_AUTH_TOKEN" in _one_line(e)


def test_right_token_passes_the_auth_check(clean_env, token_dashboard, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", GOOD)
    client = sub._client(token_dashboard, sub.find_auth_token()[0])
    assert client._headers["Authorization"] == f"Bearer {GOOD}"


def test_unreachable_dashboard_is_one_line(clean_env):
    with pytest.raises(UserError) as e:
        sub.submit(SMOKE, address=f"127.0.0.1:{_free_port()}", overrides=[])
    assert "cannot reach the Ray dashboard" in _one_line(e)


def test_token_lookup_follows_rays_order(clean_env, monkeypatch):
    assert sub.find_auth_token()[0] is None
    (clean_env / ".ray").mkdir()
    (clean_env / ".ray" / "auth_token").write_text("from-home\n")
    assert sub.find_auth_token()[0] == "from-home"
    path = clean_env / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert sub.find_auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.find_auth_token() == ("from-env", "RAY_AUTH_TOKEN")


def test_token_path_pointing_nowhere_is_a_user_error(clean_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean_env / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        sub.find_auth_token()


def test_address_resolution(clean_env, monkeypatch):
    assert sub.resolve_address("head:8265") == "http://head:8265"
    assert sub.resolve_address("https://head:8265/") == "https://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert sub.resolve_address(None) == "http://from-env:8265"
    assert sub.resolve_address("http://flag:8265") == "http://flag:8265"
    with pytest.raises(UserError, match="Ray Client address"):
        sub.resolve_address("ray://head:10001")


def test_entrypoint_round_trips_through_the_shell():
    overrides = ["train.epochs=3", "data.source=s3://b/it's here.txt", "model.rafm.ranks=[4, 32]"]
    cmd = sub.build_entrypoint("jobs/criteo_fm.yaml", overrides)
    assert shlex.split(cmd) == [
        "python",
        "-m",
        "ravfm",
        "train",
        "--config",
        "jobs/criteo_fm.yaml",
        *overrides,
    ]


def test_job_outside_the_project_is_refused(clean_env, tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text(Path(SMOKE).read_text())
    with pytest.raises(UserError, match="outside the project"):
        sub.submit(str(outside), address="http://127.0.0.1:1", overrides=[])


def test_working_dir_ships_sources_but_not_venv_data_or_runs(tmp_path):
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    for rel in (
        "ravfm/data/schemas.py",
        "ravfm/cli.py",
        "jobs/smoke.yaml",
        "bench/b.py",
        "data/smoke/part-0.parquet",
        "runs/smoke/summary.json",
        ".venv/bin/python",
        "bench/results/x.json",
        ".git/HEAD",
        "ravfm/__pycache__/cli.cpython-311.pyc",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / ".gitignore").write_text("data/\n")  # broad pattern that also hits ravfm/data
    seen: list[str] = []
    excludes = sub.build_runtime_env(tmp_path)["excludes"]
    _dir_travel(
        tmp_path,
        [_get_excludes(tmp_path, excludes)],
        lambda p: p.is_file() and seen.append(p.relative_to(tmp_path).as_posix()),
        include_gitignore=False,
    )  # submit sets RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1
    assert sorted(seen) == [
        ".gitignore",
        "bench/b.py",
        "jobs/smoke.yaml",
        "ravfm/cli.py",
        "ravfm/data/schemas.py",
    ]


class _FakeClient:
    def __init__(self, final: str):
        self.final, self.calls = final, {}

    def submit_job(self, **kw):
        self.calls = dict(kw, env=dict(os.environ))
        return kw["submission_id"]

    async def tail_job_logs(self, job_id):
        yield "epoch 1 done\n"

    def get_job_status(self, job_id):
        return SimpleNamespace(value=self.final)

    def get_job_info(self, job_id):
        return SimpleNamespace(message="boom" if self.final != "SUCCEEDED" else "")


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_follows_logs_and_maps_the_final_status(clean_env, monkeypatch, capsys, final, code):
    fake = _FakeClient(final)
    monkeypatch.setattr(sub, "_client", lambda url, token: fake)
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    rc = sub.submit(SMOKE, address="http://head:8265", overrides=["train.epochs=1"])
    out = capsys.readouterr()
    assert rc == code
    job_id = out.out.splitlines()[0]
    assert job_id.startswith("ravfm_smoke_") and "epoch 1 done" in out.out
    assert final in out.err
    assert fake.calls["entrypoint"] == (
        "python -m ravfm train --config jobs/smoke.yaml train.epochs=1"
    )
    assert fake.calls["runtime_env"]["working_dir"] == str(ROOT)
    assert "RAY_ADDRESS" not in fake.calls["env"]
    assert fake.calls["env"]["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] == "1"
    assert os.environ["RAY_ADDRESS"] == "http://elsewhere:8265"
    assert "RAY_RUNTIME_ENV_IGNORE_GITIGNORE" not in os.environ


def test_submit_without_follow_returns_once_accepted(clean_env, monkeypatch, capsys):
    fake = _FakeClient("FAILED")
    monkeypatch.setattr(sub, "_client", lambda url, token: fake)
    assert sub.submit(SMOKE, address="http://head:8265", overrides=[], follow=False) == 0
    assert capsys.readouterr().out.startswith("ravfm_smoke_")
