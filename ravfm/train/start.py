"""Can a run start from this checkpoint? Checked before any worker starts, one line if not."""

from __future__ import annotations

from typing import Any

from ravfm.config import RunConfig
from ravfm.errors import UserError
from ravfm.features.spec import FeatureSpec
from ravfm.storage import Store
from ravfm.train.checkpoint import read_manifest

__all__ = ["check_start_checkpoint"]

_MODEL_KEYS = ("name", "k", "task")


def check_start_checkpoint(path: str, cfg: RunConfig, spec: FeatureSpec, *, warm: bool) -> dict:
    """The verified manifest of `path` when `cfg` (on data hashed by `spec`) may start from it:
    the same feature spec and model, and for a resume (warm=False) the same sparse optimizer,
    whose per-row state the checkpoint holds."""
    meta = read_manifest(path)
    flag = "--init-from" if warm else "--resume"
    FeatureSpec.load(Store(meta["path"]).url_of("spec")).check_compatible(spec)
    saved = meta["config"]
    for key in _MODEL_KEYS:
        if saved["model"].get(key) != getattr(cfg.model, key):
            raise UserError(
                f"{flag} {meta['path']} has model.{key}={saved['model'].get(key)!r} but this "
                f"run has {getattr(cfg.model, key)!r}; use the checkpoint's model settings"
            )
    if saved["model"].get("vfm", {}).get("components", 1) != cfg.model.vfm.components:
        raise UserError(
            f"{flag} {meta['path']} has model.vfm.components="
            f"{saved['model']['vfm']['components']}; use the same number of components"
        )
    if not warm:
        _same(meta, saved["optim"], cfg.optim, ("sparse", "rowwise"), "optim")
    return meta


def _same(meta: dict, saved: dict, now: Any, keys: tuple[str, ...], section: str) -> None:
    for key in keys:
        if saved.get(key) != getattr(now, key):
            raise UserError(
                f"--resume {meta['path']} was trained with {section}.{key}={saved.get(key)!r}, "
                f"whose state it holds, but this run has {getattr(now, key)!r}; resume with "
                f"{section}.{key}={saved.get(key)} (or start a new run with --init-from)"
            )
