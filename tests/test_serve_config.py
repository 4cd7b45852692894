"""`ravfm serve` settings and entry points without a cluster: the config layers, one-line errors,
the serve job file, the CLI's default action and `ravfm submit` of a serve job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ravfm import submit as sub
from ravfm.cli import main
from ravfm.errors import UserError
from ravfm.serve.config import ServeConfig, is_serve_job, load_serve_config

ROOT = Path(__file__).resolve().parent.parent
SERVE_JOB = ROOT / "jobs" / "serve" / "smoke.yaml"


def test_config_layers_defaults_then_file_then_overrides_then_flags(tmp_path):
    job = tmp_path / "s.yaml"
    job.write_text("serve:\n  checkpoint: runs/x/checkpoints\n  replicas: 3\n  port: 9000\n")
    cfg = load_serve_config(
        job, ["serve.port=9100", "batch_wait_ms=2"], {"port": 9200, "host": None}
    )
    assert (cfg.checkpoint, cfg.replicas, cfg.port, cfg.batch_wait_ms) == (
        "runs/x/checkpoints",
        3,
        9200,
        2.0,
    )
    assert cfg.host == ServeConfig.host and cfg.max_body_bytes == 16 * 2**20
    assert cfg.url() == "http://127.0.0.1:9200/"


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        ("serve:\n  checkpoint: c\n  port: 0\n", [], "serve.port=0 must be a port number"),
        ("serve:\n  checkpoint: c\n  replica: 2\n", [], "unknown config key serve.replica"),
        ("serve:\n  checkpoint: c\ntrain:\n  epochs: 1\n", [], "top-level 'train' beside serve:"),
        ("serve:\n  replicas: 2\n", [], "no checkpoint to serve: pass --checkpoint"),
        ("serve:\n  checkpoint: c\n", ["route_prefix=/a"], "must start and end with /"),
        ("serve:\n  checkpoint: c\n", ["replicas=two"], "serve.replicas must be an integer"),
        ("serve: [1]\n", [], "must be a mapping"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(tmp_path, text, overrides, fragment):
    job = tmp_path / "s.yaml"
    job.write_text(text)
    with pytest.raises(UserError) as e:
        load_serve_config(job, overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_serve_job_file_is_a_commented_serve_job():
    assert is_serve_job(SERVE_JOB) and not is_serve_job(ROOT / "jobs" / "smoke.yaml")
    cfg = load_serve_config(SERVE_JOB)
    assert cfg.checkpoint == "runs/smoke/checkpoints" and cfg.watch_s > 0
    text = SERVE_JOB.read_text()
    keys = yaml.safe_load(text)["serve"]
    assert text.startswith("#") and all(f"{k}:" in text for k in keys)
    assert sum("#" in line for line in text.splitlines()) > len(keys)


def test_cli_serve_defaults_to_start_and_reports_user_errors_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravfm serve: error: no checkpoint to serve") and "\n" not in err
    assert main(["serve", "--checkpoint", "/nowhere/checkpoints", "--detach"]) == 2
    assert "--detach leaves the app on a running cluster" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "reload"])  # --checkpoint is required: argparse's usage error


def test_serve_start_refuses_a_missing_checkpoint_before_starting_ray(capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # would fail loudly if contacted
    assert main(["serve", "--checkpoint", "/nowhere/checkpoints", "--replicas", "2"]) == 2
    assert "no checkpoint found at /nowhere/checkpoints" in capsys.readouterr().err


def test_submit_runs_a_serve_job_with_the_serve_entrypoint(monkeypatch, capsys):
    calls = {}

    class Client:
        def submit_job(self, **kw):
            calls.update(kw)
            return kw["submission_id"]

    monkeypatch.setattr(sub, "_client", lambda url, token: Client())
    monkeypatch.setattr(sub, "find_auth_token", lambda: (None, "nowhere"))
    rc = sub.submit(
        str(SERVE_JOB), address="http://head:8265", overrides=["serve.replicas=2"], follow=False
    )
    assert rc == 0 and capsys.readouterr().out.startswith("ravfm_ravfm_")
    assert calls["entrypoint"] == (
        "python -m ravfm serve --config jobs/serve/smoke.yaml serve.replicas=2"
    )
    assert calls["metadata"]["ravfm_command"] == "serve"
    with pytest.raises(UserError, match="serve.replicas must be at least 1"):
        sub.submit(str(SERVE_JOB), address="http://head:8265", overrides=["serve.replicas=0"])
