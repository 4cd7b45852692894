"""`ravfm serve` settings: a frozen dataclass, from defaults, a YAML `serve:` section and flags.

A serve job file (e.g. jobs/serve_smoke.yaml) holds one top-level section, `serve:`, so
`ravfm submit` can tell it from a training job and run it as `ravfm serve --config FILE`. It
lives beside the server rather than in ravfm.config, so training's RunConfig, and with it
every checkpoint manifest, is unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ravfm.config import apply_overrides, from_dict
from ravfm.errors import UserError

__all__ = ["ServeConfig", "load_serve_config", "is_serve_job", "SECTION", "INGRESSES"]

SECTION = "serve"
INGRESSES = ("auto", "haproxy", "proxy")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class ServeConfig:
    """One served model: where its checkpoint is, where it listens, how it batches."""

    checkpoint: str = ""  # runs/NAME/checkpoints (its newest complete step) or one step-* folder
    name: str = "ravfm"  # the Serve application's name; several models need several names
    route_prefix: str = "/"  # POST {route_prefix}predict, GET {route_prefix}healthz, .../model
    host: str = "127.0.0.1"  # 0.0.0.0 to take requests from other machines (Serve-wide)
    port: int = 8000  # Serve-wide: the first app started on a cluster sets host and port
    replicas: int = 1
    cpus_per_replica: float = 1.0  # logical CPUs reserved per replica (torch/Polars threads)
    max_ongoing_requests: int = 64  # per replica; queued at the proxy beyond it
    max_batch_rows: int = 4096  # rows per dynamic batch; a bigger request is scored alone
    batch_wait_ms: float = 0.0  # > 0: a batch waits this long for more requests after its first
    max_body_mb: float = 16.0  # request bodies above this get HTTP 413
    watch_s: float = 0.0  # > 0: look for a newer checkpoint every watch_s seconds, roll it out
    ingress: str = "auto"  # haproxy | proxy | auto (haproxy where Ray ships it); Serve-wide
    ready_timeout_s: float = 600.0  # how long deploy and reload wait for the replicas

    def __post_init__(self) -> None:
        _check(
            bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
            f"serve.name={self.name!r} must be a plain name (letters, digits, - and _)",
        )
        _check(
            self.route_prefix.startswith("/") and self.route_prefix.endswith("/"),
            f"serve.route_prefix={self.route_prefix!r} must start and end with /, e.g. /criteo/",
        )
        _check(0 < self.port < 65536, f"serve.port={self.port} must be a port number (1-65535)")
        _check(self.replicas >= 1, "serve.replicas must be at least 1")
        _check(self.cpus_per_replica >= 0, "serve.cpus_per_replica must be >= 0")
        _check(self.max_ongoing_requests >= 1, "serve.max_ongoing_requests must be at least 1")
        _check(self.max_batch_rows >= 1, "serve.max_batch_rows must be at least 1")
        _check(self.batch_wait_ms >= 0, "serve.batch_wait_ms must be >= 0")
        _check(self.max_body_mb > 0, "serve.max_body_mb must be positive")
        _check(self.watch_s >= 0, "serve.watch_s must be >= 0 (0 = no watching)")
        _check(self.ready_timeout_s > 0, "serve.ready_timeout_s must be positive")
        _check(
            self.ingress in INGRESSES,
            f"serve.ingress={self.ingress!r} is not one of {', '.join(INGRESSES)}",
        )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def url(self, host: str | None = None) -> str:
        """http://HOST:PORT{route_prefix} (0.0.0.0 shown as 127.0.0.1, the local address)."""
        h = host or ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host)
        return f"http://{h}:{self.port}{self.route_prefix}"


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    _check(
        p.is_file(), f"config file {p} does not exist; pass a path such as jobs/serve_smoke.yaml"
    )
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    _check(loaded is None or isinstance(loaded, dict), f"config file {p} must hold a mapping")
    return loaded or {}


def is_serve_job(path: str | Path) -> bool:
    """Whether the YAML file at `path` is a serve job (a top-level `serve:` section)."""
    try:
        tree = _read_yaml(path)
    except UserError:
        return False
    return SECTION in tree


def load_serve_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> ServeConfig:
    """Defaults, then the file's `serve:` section, then `serve.key=value` overrides, then the
    command-line flags that were given (not None); validated once."""
    tree: dict = {}
    if path is not None:
        tree = _read_yaml(path)
        extra = sorted(set(tree) - {SECTION})
        if extra:
            raise UserError(
                f"config file {path} has a top-level {extra[0]!r} beside serve:; a serve job "
                "holds only a serve: section (training settings come from the checkpoint)"
            )
    keyed = [o if o.startswith(SECTION + ".") else f"{SECTION}.{o}" for o in overrides or []]
    section = apply_overrides(tree, keyed).get(SECTION) or {}
    _check(isinstance(section, dict), f"serve: in {path} must be a mapping of settings")
    section = {**section, **{k: v for k, v in (flags or {}).items() if v is not None}}
    cfg = from_dict(ServeConfig, section, prefix=SECTION + ".")
    _check(
        bool(cfg.checkpoint),
        "no checkpoint to serve: pass --checkpoint runs/NAME/checkpoints (or serve.checkpoint "
        "in the config file)",
    )
    return cfg
