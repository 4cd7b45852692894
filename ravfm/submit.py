"""`ravfm submit`: run a YAML training job on a remote Ray cluster through the Jobs API.

The job is validated here first (a bad config never reaches the cluster), then submitted with
the project root as the runtime_env working_dir, so the cluster runs this checkout of ravfm:
entrypoint `python -m ravfm train --config <job> <overrides>`, or for a serve job (a YAML file
with a top-level `serve:` section, e.g. jobs/serve/smoke.yaml) `python -m ravfm serve --config
<job> <overrides>`, which serves the model until the job is stopped. Logs are followed until the job
ends and the exit status says how it ended (0 SUCCEEDED, 1 FAILED or STOPPED).

Token authentication (Ray >= 2.52, `RAY_AUTH_MODE=token`): the dashboard answers 401 without a
token and 403 with a wrong one. The token is read the way Ray's own token loader reads it:
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and sent as
`Authorization: Bearer ...` whether or not RAY_AUTH_MODE is set on this machine.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ravfm.config import load_config
from ravfm.errors import UserError

__all__ = [
    "submit",
    "resolve_address",
    "find_auth_token",
    "auth_error",
    "build_entrypoint",
    "build_runtime_env",
    "project_root",
    "WORKING_DIR_EXCLUDES",
]

# Paths of the project root that never travel to the cluster (gitignore syntax, root-anchored).
WORKING_DIR_EXCLUDES = [
    "/.venv",
    "/data",
    "/runs",
    "/.git",
    "/bench/results",
    "__pycache__",
    "*.pyc",
    "/.pytest_cache",
    "/.ruff_cache",
    "*.egg-info",
    "/build",
    "/dist",
    "/tmp",
]

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_TOKEN_HELP = (
    "print the head node's token with `ray get-auth-token` (on the head) and export it "
    "as RAY_AUTH_TOKEN, or save it to ~/.ray/auth_token (or a file named by "
    "RAY_AUTH_TOKEN_PATH)"
)


def project_root() -> Path:
    """The checkout that holds this ravfm package: what the cluster receives as working_dir."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "ravfm" / "cli.py").is_file():
        raise UserError(
            f"ravfm submit ships the source checkout to the cluster, but ravfm is "
            f"installed from {root} without one; run it from a git clone of ravfm"
        )
    return root


def resolve_address(address: str | None) -> str:
    """The dashboard URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    address = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    ).strip()
    if not address:
        raise UserError(
            "no Ray cluster address: pass --address http://HEAD:8265 (the head "
            "node's dashboard) or set RAY_ADDRESS=http://HEAD:8265"
        )
    if address.startswith("ray://"):
        raise UserError(
            f"--address {address} is a Ray Client address; jobs are submitted to "
            "the dashboard instead: --address http://HEAD:8265"
        )
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address} must be the dashboard's http(s)://HEAD:8265 URL")
    return address.rstrip("/")


def find_auth_token() -> tuple[str | None, str]:
    """(token or None, where it came from), in the order Ray's AuthenticationTokenLoader uses."""
    env = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env:
        return env, "RAY_AUTH_TOKEN"
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_var:
        p = Path(path_var).expanduser()
        token = p.read_text().strip() if p.is_file() else ""
        if not token:
            raise UserError(
                f"RAY_AUTH_TOKEN_PATH={path_var} is missing or empty; point it at "
                "the file holding the cluster's token, or unset it"
            )
        return token, f"RAY_AUTH_TOKEN_PATH ({p})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "nowhere (no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"


def build_entrypoint(job: str, overrides: list[str], command: str = "train") -> str:
    """The shell command the cluster runs, from the project root (args shell-quoted);
    command: train, or serve for a serve job."""
    args = ["python", "-m", "ravfm", command, "--config", job, *overrides]
    return " ".join(shlex.quote(a) for a in args)


def build_runtime_env(root: Path) -> dict:
    """runtime_env shipping `root` (this checkout) without venvs, data, runs or git history."""
    return {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}


def _job_in_root(job: str, root: Path) -> str:
    path = Path(job).resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise UserError(
            f"job file {job} is outside the project {root}, which is all the cluster "
            "receives; copy it under jobs/ and submit that"
        ) from None
    return rel.as_posix()


@contextmanager
def _client_env():
    """Environment the Jobs client reads, set for the duration of the submission only.

    JobSubmissionClient lets RAY_ADDRESS override its address argument (--address must win),
    and by default drops whatever .gitignore lists from working_dir; WORKING_DIR_EXCLUDES is the
    one list of what stays home, so a broad .gitignore pattern cannot drop package sources.
    """
    keys = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
        os.environ.update(saved)


def auth_error(address: str, token: str | None, source: str) -> UserError:
    if token is None:
        return UserError(
            f"the Ray cluster at {address} requires an authentication token and "
            f"none was found; {_TOKEN_HELP}"
        )
    return UserError(
        f"the Ray cluster at {address} rejected the token from {source} "
        f"(wrong token or another cluster's); {_TOKEN_HELP}"
    )


def _status_code(exc: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        code = getattr(exc, attr, None)
        if isinstance(code, int):
            return code
    text = str(exc)
    if text.startswith("Authentication required"):
        return 401
    if text.startswith("Authentication failed"):
        return 403
    return None


@contextmanager
def _translate_errors(address: str, token: str | None, source: str):
    """Turn the Jobs API's auth and connection failures into one-line UserErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise auth_error(address, token, source) from e
    except ConnectionError as e:
        raise UserError(
            f"cannot reach the Ray dashboard at {address}; check --address (the "
            "head's http://HOST:8265, not the GCS port 6379) and that the head is up "
            "(`ray status` on it)"
        ) from e
    except Exception as e:  # aiohttp's WSServerHandshakeError on the log stream, among others
        if _status_code(e) in (401, 403):
            raise auth_error(address, token, source) from e
        raise


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


async def _tail(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait(client, job_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL:
            return status
        time.sleep(poll_s)


def submit(job: str, *, address: str | None, overrides: list[str], follow: bool = True) -> int:
    """Validate `job` with `overrides`, submit it to the cluster at `address`, follow its logs.

    Prints the submission id first. Returns 0 when the job SUCCEEDED, 1 when it FAILED or was
    STOPPED; with follow=False returns 0 as soon as the job is accepted.
    """
    from ravfm.serve.config import is_serve_job, load_serve_config

    command = "serve" if is_serve_job(job) else "train"
    cfg = load_serve_config(job, overrides) if command == "serve" else load_config(job, overrides)
    root = project_root()
    rel_job = _job_in_root(job, root)
    url = resolve_address(address)
    token, source = find_auth_token()
    submission_id = f"ravfm_{cfg.name}_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(2)}"
    with _translate_errors(url, token, source):
        with _client_env():
            client = _client(url, token)
            job_id = client.submit_job(
                entrypoint=build_entrypoint(rel_job, overrides)
                if command == "train"
                else build_entrypoint(rel_job, overrides, command),
                runtime_env=build_runtime_env(root),
                submission_id=submission_id,
                metadata={"ravfm_job": cfg.name, "ravfm_config": rel_job, "ravfm_command": command},
            )
        print(job_id, flush=True)
        if not follow:
            print(
                f"ravfm submit: not following; `ray job logs --follow {job_id} "
                f"--address {url}` shows its logs",
                file=sys.stderr,
            )
            return 0
        try:
            asyncio.run(_tail(client, job_id))
            status = _wait(client, job_id)
        except KeyboardInterrupt:
            print(
                f"ravfm submit: stopped following; {job_id} keeps running (stop it with "
                f"`ray job stop {job_id} --address {url}`)",
                file=sys.stderr,
            )
            raise
    message = client.get_job_info(job_id).message or ""
    print(
        f"ravfm submit: {job_id} {status}"
        + (f": {message}" if status != "SUCCEEDED" and message else ""),
        file=sys.stderr,
    )
    return 0 if status == "SUCCEEDED" else 1
