"""Checkpoints: manifest + feature spec + dense parameters + embedding rows by global row id.

Layout of `<run>/checkpoints/step-000000123/` (a local directory or an object-store prefix):
  spec/                      the feature spec (and the frequency table RaFM's levels come from)
  dense.safetensors          replicated parameters and buffers (bias, VFM priors, RaFM remaps)
  dense_optim.safetensors    the dense optimizer's state (ravfm.distributed.dense.DenseOptimizer)
  rows-00000-of-00002.safetensors   each rank's embedding rows and their optimizer state, keyed by
                             global row id, so a run can resume on a different number of workers
  seen-00000.npy             row numbers each rank consumed in the current epoch (exact resume)
  manifest.json              written LAST: step, epoch, world size, versions, resolved config,
                             metrics, data position, and every file above with its size and SHA-256

Every rank writes its own rows straight to the checkpoint's storage and reports their digests;
rank 0 writes the shared files and then the manifest. A checkpoint without a manifest is
incomplete (a crash mid-write) and is never read; one whose files do not match their manifest
entries is refused naming the file. Choosing the newest checkpoint of a directory skips both
kinds with one line each. Nothing is unpickled: every tensor goes through safetensors, and
only after its file's checksum matched.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from ravfm.errors import UserError
from ravfm.model.layers import is_table
from ravfm.storage import Store, verify_files

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "read_manifest",
    "table_modules",
    "dense_state",
    "load_model",
    "load_seen",
]

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_PREFIX = "step-"


def table_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Embedding tables of `model` by module path (ravfm.model.layers.is_table)."""
    return {name: m for name, m in model.named_modules() if is_table(m)}


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers that are not embedding rows (replicated on every rank)."""
    tables = tuple(n + "." for n in table_modules(model))
    return {
        k: v.detach().cpu().contiguous()
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


def _put_tensors(store: Store, name: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """safetensors through a local temporary file (no second copy of a large table in memory)."""
    fd, tmp = tempfile.mkstemp(
        prefix=".ravfm-", suffix=".safetensors", dir=store.path() if store.local else None
    )
    os.close(fd)
    try:
        save_file(tensors, tmp)
        return store.put_file(tmp, name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def save_checkpoint(
    root: str,
    step: int,
    *,
    model: nn.Module,
    sparse_opt: Any,
    dense_opt: Any,
    world: Any,
    manifest: dict,
    spec_dir: str,
    seen: np.ndarray | None = None,
    keep: int = 2,
    protect: tuple[str, ...] = (),
    suffix: str = "",
) -> str:
    """Write checkpoint `step` under `root` (all ranks call this); returns its URL.

    keep: the newest complete checkpoints to keep; protect: names never pruned (the best)."""
    name = f"{_PREFIX}{step:09d}{suffix}"
    store = Store(root).child(name)
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    if rank == 0:
        store.remove()  # an incomplete (or superseded) write of the same name
        store.makedirs()
    _barrier(world)
    files = {}
    rows = f"rows-{rank:05d}-of-{size:05d}.safetensors"
    files[rows] = _put_tensors(store, rows, _rows_payload(model, sparse_opt))
    if seen is not None:
        files[f"seen-{rank:05d}.npy"] = store.write_bytes(
            f"seen-{rank:05d}.npy", _npy_bytes(np.asarray(seen, dtype=np.int64))
        )
    gathered = world.gather_objects(files) if world is not None else [files]
    if rank == 0:
        for part in gathered:
            files.update(part)
        files["dense.safetensors"] = _put_tensors(store, "dense.safetensors", dense_state(model))
        if dense_opt is not None:
            files["dense_optim.safetensors"] = _put_tensors(
                store, "dense_optim.safetensors", dense_opt.state_dict()
            )
        spec = Store(spec_dir)
        for f in spec.walk_files():
            if not f.endswith(".tmp") and "/.tmp" not in f:
                files[f"spec/{f}"] = store.write_bytes(f"spec/{f}", spec.read_bytes(f))
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": size,
            "written_at": time.time(),
            "versions": _versions(),
            **manifest,
            "files": {k: {"bytes": n, "sha256": sha} for k, (n, sha) in sorted(files.items())},
        }
        store.write_json(MANIFEST, meta)  # last: the checkpoint exists from here on
    _barrier(world)
    if rank == 0:
        _prune(Store(root), keep, protect + (name,))
    _barrier(world)
    return store.url


def _versions() -> dict[str, str]:
    import ravfm

    return {"ravfm": ravfm.__version__, "torch": torch.__version__}


def _candidates(root: Store) -> list[str]:
    return sorted((n for n in root.list() if n.startswith(_PREFIX)), reverse=True)


def _prune(root: Store, keep: int, protect: tuple[str, ...]) -> None:
    """Keep the newest `keep` complete checkpoints and `protect`; drop older ones and any
    incomplete write older than the newest complete one."""
    complete = [n for n in _candidates(root) if root.exists(f"{n}/{MANIFEST}")]
    if not complete:
        return
    keep_names = set(complete[: max(1, keep)]) | set(protect)
    for n in _candidates(root):
        if n in keep_names or n > complete[0]:
            continue  # a newer write may be under way
        root.remove(n)


def _say(msg: str) -> None:
    print(f"ravfm: {msg}", file=sys.stderr, flush=True)


def _verified(store: Store) -> dict:
    """The manifest of the checkpoint at `store`, after every file it lists was verified."""
    what = f"checkpoint {store.url}"
    try:
        meta = store.read_json(MANIFEST)
    except FileNotFoundError:
        raise UserError(f"{what} is incomplete (no {MANIFEST}: it was being written)") from None
    except ValueError:
        raise UserError(f"{what}: {MANIFEST} is damaged (not valid JSON)") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(
            f"{what} has format version {version}, this ravfm reads version "
            f"{FORMAT_VERSION}; use the ravfm release that wrote it"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{what}: {MANIFEST} lists no files; the checkpoint is damaged")
    verify_files(store, files, what)
    world = int(meta.get("world_size", 0))
    want = {f"rows-{r:05d}-of-{world:05d}.safetensors" for r in range(world)}
    if not want <= set(files) or "dense.safetensors" not in files:
        raise UserError(f"{what}: {MANIFEST} does not list every rank's rows; it is damaged")
    meta["path"] = store.url
    return meta


def latest_checkpoint(path: str) -> str | None:
    """The newest checkpoint at `path` that verifies (a step directory itself, or the newest
    under a run's checkpoints/ directory), or None when there is none. Damaged or incomplete
    ones are skipped with one line each."""
    meta = _resolve(path, required=False)
    return None if meta is None else meta["path"]


def _resolve(path: str, required: bool) -> dict | None:
    store = Store(path)
    if store.exists(MANIFEST) or not store.list():
        if not store.exists(MANIFEST):
            if required:
                raise UserError(
                    f"no checkpoint found at {path}; pass a checkpoint directory "
                    "(runs/NAME/checkpoints or one of its step-* folders)"
                )
            return None
        return _verified(store)
    skipped = []
    for name in _candidates(store):
        try:
            meta = _verified(store.child(name))
        except UserError as e:
            _say(f"skipping {e}")
            skipped.append(name)
            continue
        if skipped:
            _say(f"using checkpoint {meta['path']}")
        return meta
    if required:
        found = f" ({len(skipped)} skipped as damaged or incomplete)" if skipped else ""
        raise UserError(
            f"no usable checkpoint found at {path}{found}; pass a checkpoint directory "
            "(runs/NAME/checkpoints or one of its step-* folders)"
        )
    return None


def read_manifest(path: str) -> dict:
    """The verified manifest of checkpoint `path` (a step directory, or a run's checkpoints/
    directory: its newest checkpoint that verifies); meta["path"] is the step directory."""
    return _resolve(str(path), required=True)


def _load_tensors(store: Store, name: str) -> dict[str, torch.Tensor]:
    return load_bytes(store.read_bytes(name))


def load_checkpoint(
    path: str,
    *,
    model: nn.Module,
    sparse_opt: Any = None,
    dense_opt: Any = None,
    meta: dict | None = None,
) -> dict:
    """Load checkpoint `path` into `model` (and optimizers); every rank reads every rows file
    and keeps the rows it owns, so the saving and loading world sizes may differ. `meta`: the
    manifest read_manifest already verified (else it is read and verified here)."""
    meta = meta or read_manifest(path)
    store = Store(meta["path"])
    dense = _load_tensors(store, "dense.safetensors")
    own = dense_state(model)
    missing, unexpected = set(own) - set(dense), set(dense) - set(own)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {store.url} does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); train with the checkpoint's config"
        )
    for name, t in sorted(dense.items()):
        if t.shape != own[name].shape:
            raise UserError(
                f"checkpoint {store.url} does not fit this model ({name} has shape "
                f"{tuple(t.shape)}, the model's is {tuple(own[name].shape)}; written by another "
                "config or an older ravfm); train with the checkpoint's config"
            )
    model.load_state_dict(dense, strict=False)
    tables = table_modules(model)
    rows_files = sorted(f for f in meta["files"] if f.startswith("rows-"))
    for f in rows_files:
        rows = _load_tensors(store, f)
        for name, table in tables.items():
            if f"{name}/ids" not in rows:
                raise UserError(
                    f"checkpoint {store.url} has no rows for table {name}; train with the "
                    "checkpoint's model config"
                )
            weight = rows[f"{name}/weight"]
            if weight.shape[1] != table.dim:
                raise UserError(
                    f"checkpoint {store.url} has rows of width {weight.shape[1]} for table "
                    f"{name}, this model's are {table.dim} wide; train with the checkpoint's config"
                )
            table.import_rows(rows[f"{name}/ids"], weight)
        if sparse_opt is not None:
            state = {k[len("optim/") :]: v for k, v in rows.items() if k.startswith("optim/")}
            sparse_opt.import_state(state)
    if dense_opt is not None and "dense_optim.safetensors" in meta["files"]:
        dense_opt.load_state_dict(_load_tensors(store, "dense_optim.safetensors"))
    return meta


def load_seen(meta: dict) -> np.ndarray:
    """Row numbers consumed in the checkpoint's epoch, over all ranks (sorted, unique)."""
    store = Store(meta["path"])
    parts = [
        np.load(io.BytesIO(store.read_bytes(f)), allow_pickle=False)
        for f in sorted(meta["files"])
        if f.startswith("seen-")
    ]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def load_model(
    path: str, device: str = "cpu", meta: dict | None = None
) -> tuple[nn.Module, Any, dict]:
    """A checkpoint's model in one process for inference: (model in eval mode, spec, manifest).
    All rows of every rank's file are loaded into local tables. meta: the manifest, when the
    caller already read and verified it."""
    from ravfm.config import RunConfig, from_dict
    from ravfm.distributed.rows import skip_init
    from ravfm.distributed.world import World
    from ravfm.train.setup import build_for_training

    meta = meta or read_manifest(path)
    cfg = from_dict(RunConfig, meta["config"])
    world = World.single(torch.device(device))
    spec_dir = Store(meta["path"]).url_of("spec")
    with skip_init():  # every row comes from the checkpoint
        model, spec = build_for_training(
            cfg, spec_dir, world, n_train=int(meta.get("n_train", 1)), kind="sparse"
        )
    load_checkpoint(meta["path"], model=model, meta=meta)
    model.eval()
    return model, spec, meta
