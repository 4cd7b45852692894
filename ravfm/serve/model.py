"""One checkpoint loaded for online requests: its request reader, its scorer and its identity.

No Ray here: a Serve replica holds one ServedModel at a time and swaps in a new one whole, so
a request is read and scored by one model. Predictions go through `ravfm.scorer.Scorer` and
`ravfm.features.transform`, the code `ravfm score` runs, so the same rows give the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ravfm.errors import UserError
from ravfm.features.spec import FeatureSpec
from ravfm.scorer import PREDICTION, PREDICTION_STD, PREDICTION_STD_MODEL, Scorer
from ravfm.serve.layouts import BadRequest
from ravfm.serve.rows import Lines, RequestReader
from ravfm.storage import Store, is_url
from ravfm.train.checkpoint import latest_checkpoint, read_manifest

__all__ = ["ServedModel", "check_checkpoint", "describe", "metrics_at_save", "step_dir"]


def step_dir(checkpoint: str | Path) -> str:
    """The step-* folder to serve: `checkpoint` itself, or the newest complete one under it."""
    ckpt = latest_checkpoint(checkpoint)
    if ckpt is None:
        raise UserError(
            f"no checkpoint found at {checkpoint}; pass a checkpoint directory "
            "(runs/NAME/checkpoints or one of its step-* folders)"
        )
    return ckpt if is_url(ckpt) else str(Path(ckpt).resolve())


def check_checkpoint(checkpoint: str | Path) -> tuple[dict, FeatureSpec]:
    """(manifest, spec) of a servable checkpoint, without loading its weights: its dataset has
    a request layout and, for MovieLens, the side tables its fields need."""
    meta = read_manifest(checkpoint)
    spec = FeatureSpec.load(Store(meta["path"]).url_of("spec"))
    RequestReader(spec, Path(meta["path"]) / "spec")
    return meta, spec


def metrics_at_save(meta: dict) -> dict:
    """The metrics a checkpoint was saved with: the manifest's own `metrics` when it has them,
    else its training history's last epoch (train and valid) and best validation value."""
    if meta.get("metrics"):
        return dict(meta["metrics"])
    history = meta.get("history") or {}
    epochs = history.get("epochs") or []
    out: dict[str, Any] = {}
    if epochs:
        last = epochs[-1]
        out = {"epoch": last.get("epoch"), "train": last.get("train"), "valid": last.get("valid")}
    if history.get("best") is not None:
        out["best_valid"] = history["best"]
    return out


def describe(meta: dict, spec: FeatureSpec, reader: RequestReader) -> dict:
    """What GET /model answers: name, step, spec key, metrics at save time, the columns."""
    cfg = meta.get("config") or {}
    lay = reader.layout
    return {
        "name": cfg.get("name"),
        "step": int(meta["step"]),
        "spec": spec.fingerprint,
        "metrics": metrics_at_save(meta),
        "model": (cfg.get("model") or {}).get("name"),
        "task": meta.get("task", spec.task),
        "dataset": spec.dataset,
        "checkpoint": str(meta["path"]),
        "written_at": meta.get("written_at"),
        "required_columns": list(reader.required),
        "optional_columns": [c for c in reader.sent if c not in reader.required],
        "ignored_columns": list(lay.ignored),
        "example": dict(lay.example),
    }


class ServedModel:
    """A checkpoint ready for requests: body -> rows (read) -> predictions (predict)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        meta = read_manifest(checkpoint)
        self.path = str(meta["path"])
        self.scorer = Scorer(self.path, device=device, meta=meta)
        self.spec = self.scorer.spec
        self.reader = RequestReader(self.spec, Path(self.path) / "spec")
        self.info = describe(meta, self.spec, self.reader)
        self.step, self.name = self.info["step"], self.info["name"]
        self.vfm = self.scorer.vfm
        warm = {c: [self.reader.layout.example.get(c)] for c in self.reader.sent}
        self.predict(self.read(json.dumps(warm).encode()))  # compiles the kernels once, here

    def read(self, body: bytes) -> pl.DataFrame:
        """A JSON request body -> its rows in the shard schema (B rows); BadRequest if bad."""
        return self.reader.read(body)

    def prepare(self, body: bytes) -> Lines:
        """A JSON request body checked and written as raw lines (BadRequest if bad)."""
        return self.reader.prepare(body)

    def predict_many(self, requests: list[Lines]) -> list[dict[str, np.ndarray] | BadRequest]:
        """Several requests scored together: one parse, one transform, one model call. Each
        gets its own {"prediction": (B_i,), ...}, or the BadRequest for a row the parser
        rejected (the other requests are unaffected)."""
        rows, errors, counts = self.reader.parse_many(requests)
        out = self.predict(rows) if rows.height else {}
        results: list = []
        start = 0
        for err, n in zip(errors, counts):
            results.append(
                err if err is not None else {k: v[start : start + n] for k, v in out.items()}
            )
            start += n
        return results

    def predict(self, rows: pl.DataFrame) -> dict[str, np.ndarray]:
        """rows (B rows) -> {"prediction": (B,) and, for VFM, "prediction_std" and
        "prediction_std_model": (B,)}, hashed with the checkpoint's spec exactly as
        `ravfm score` hashes them (the same definitions: ravfm.scorer.Scorer)."""
        from ravfm.features.transform import transform

        out = transform(rows.to_arrow(), self.spec)  # as `ravfm score` hashes: from Arrow
        pred, std, model_std = self.scorer.predict(
            torch.from_numpy(out["ids"]), torch.from_numpy(out["values"])
        )
        result = {PREDICTION: pred.numpy()}
        if std is not None:
            result[PREDICTION_STD] = std.numpy()
            result[PREDICTION_STD_MODEL] = model_std.numpy()
        return result
