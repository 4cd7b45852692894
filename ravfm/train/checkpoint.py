"""Checkpoints: manifest + feature spec + dense parameters + embedding rows by global row id.

Layout of `<run>/checkpoints/step-000000123/`:
  manifest.json              step, epoch, world size, versions, resolved config, metrics, data position
  spec/                      the feature spec (and the frequency table RaFM's levels come from)
  dense.safetensors          replicated parameters and buffers (bias, VFM priors, RaFM remaps)
  dense_optim.pt             the dense optimizer's state dict (tensors and numbers only)
  rows-00000-of-00002.safetensors   each rank's embedding rows and their optimizer state, keyed by
                             global row id, so a run can resume on a different number of workers
  seen-00000.npy             row numbers each rank consumed in the current epoch (exact resume)

Every rank joins every barrier; rank 0 alone writes the shared files and renames the temporary
directory into place, so a crash mid-write leaves the previous checkpoint valid. Nothing is
unpickled: tensors go through safetensors, optimizer state through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ravfm.errors import UserError

__all__ = [
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "read_manifest",
    "table_modules",
    "dense_state",
    "load_model",
    "load_seen",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def table_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Embedding tables of `model` by module path (anything with export_rows/import_rows)."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "export_rows") and hasattr(m, "import_rows")
    }


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers that are not embedding rows (replicated on every rank)."""
    tables = tuple(n + "." for n in table_modules(model))
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(tables)
    }


def _barrier(world: Any) -> None:
    if world is not None and world.size > 1:
        world.barrier()


def _rows_payload(model: nn.Module, sparse_opt: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, table in table_modules(model).items():
        ids, weight = table.export_rows()
        out[f"{name}/ids"] = ids.to(torch.int64).cpu().contiguous()
        out[f"{name}/weight"] = weight.detach().cpu().contiguous()
    if sparse_opt is not None:
        for key, t in sparse_opt.export_state().items():
            out[f"optim/{key}"] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    sparse_opt: Any,
    dense_opt: torch.optim.Optimizer | None,
    world: Any,
    manifest: dict,
    spec_dir: str | Path,
    seen: np.ndarray | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` (all ranks call this); returns its final path."""
    root = Path(root)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    save_file(
        _rows_payload(model, sparse_opt), str(tmp / f"rows-{rank:05d}-of-{size:05d}.safetensors")
    )
    if seen is not None:
        np.save(tmp / f"seen-{rank:05d}.npy", np.asarray(seen, dtype=np.int64))
    if rank == 0:
        save_file(dense_state(model), str(tmp / "dense.safetensors"))
        if dense_opt is not None:
            torch.save(dense_opt.state_dict(), tmp / "dense_optim.pt")
        shutil.copytree(spec_dir, tmp / "spec")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": size,
            "written_at": time.time(),
            "versions": _versions(),
            **manifest,
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    _barrier(world)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep)
    _barrier(world)
    return final


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.ndarray, tuple)):
        return list(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


def _versions() -> dict[str, str]:
    import ravfm

    return {"ravfm": ravfm.__version__, "torch": torch.__version__}


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists())
    for old in done[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (a run's checkpoints/ directory), or None."""
    root = Path(root)
    if (root / MANIFEST).exists():
        return root
    done = sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists())
    return done[-1] if done else None


def read_manifest(path: str | Path) -> dict:
    """The manifest of checkpoint `path` (a step directory or a run's checkpoints/ directory)."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(
            f"no checkpoint found at {path}; pass a checkpoint directory "
            "(runs/NAME/checkpoints or one of its step-* folders)"
        )
    meta = json.loads((ckpt / MANIFEST).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {ckpt} has format version {meta.get('format_version')}, this "
            f"ravfm reads version {FORMAT_VERSION}; use the ravfm release that wrote it"
        )
    meta["path"] = str(ckpt)
    return meta


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    sparse_opt: Any = None,
    dense_opt: torch.optim.Optimizer | None = None,
) -> dict:
    """Load checkpoint `path` into `model` (and optimizers); every rank reads every rows file
    and keeps the rows it owns, so the saving and loading world sizes may differ."""
    meta = read_manifest(path)
    ckpt = Path(meta["path"])
    dense = load_file(str(ckpt / "dense.safetensors"))
    own = dense_state(model)
    missing, unexpected = set(own) - set(dense), set(dense) - set(own)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt} does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); train with the checkpoint's config"
        )
    for name, t in sorted(dense.items()):
        if t.shape != own[name].shape:
            raise UserError(
                f"checkpoint {ckpt} does not fit this model ({name} has shape "
                f"{tuple(t.shape)}, the model's is {tuple(own[name].shape)}; written by another "
                "config or an older ravfm); train with the checkpoint's config"
            )
    model.load_state_dict(dense, strict=False)
    tables = table_modules(model)
    for f in sorted(ckpt.glob("rows-*.safetensors")):
        rows = load_file(str(f))
        for name, table in tables.items():
            if f"{name}/ids" not in rows:
                raise UserError(
                    f"checkpoint {ckpt} has no rows for table {name}; train with the "
                    "checkpoint's model config"
                )
            weight = rows[f"{name}/weight"]
            if weight.shape[1] != table.dim:
                raise UserError(
                    f"checkpoint {ckpt} has rows of width {weight.shape[1]} for table {name}, "
                    f"this model's are {table.dim} wide; train with the checkpoint's config"
                )
            table.import_rows(rows[f"{name}/ids"], weight)
        if sparse_opt is not None:
            state = {k[len("optim/") :]: v for k, v in rows.items() if k.startswith("optim/")}
            sparse_opt.import_state(state)
    if dense_opt is not None and (ckpt / "dense_optim.pt").exists():
        dense_opt.load_state_dict(torch.load(ckpt / "dense_optim.pt", weights_only=True))
    return meta


def load_seen(path: str | Path) -> np.ndarray:
    """Row numbers consumed in the checkpoint's epoch, over all ranks (sorted, unique)."""
    ckpt = Path(read_manifest(path)["path"])
    parts = [np.load(f) for f in sorted(ckpt.glob("seen-*.npy"))]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, dict]:
    """A checkpoint's model in one process for inference: (model in eval mode, spec, manifest).
    All rows of every rank's file are loaded into local tables."""
    from ravfm.config import RunConfig, from_dict
    from ravfm.distributed.rows import skip_init
    from ravfm.distributed.world import World
    from ravfm.train.setup import build_for_training

    meta = read_manifest(path)
    cfg = from_dict(RunConfig, meta["config"])
    world = World.single(torch.device(device))
    with skip_init():  # every row comes from the checkpoint
        model, spec = build_for_training(
            cfg, Path(meta["path"]) / "spec", world, n_train=int(meta.get("n_train", 1)),
            kind="sparse",
        )  # fmt: skip
    load_checkpoint(meta["path"], model=model)
    model.eval()
    return model, spec, meta
