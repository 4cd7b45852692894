"""Helpers for the serve tests: raw sample lines as JSON request rows, converted shards of the
same lines, and small checkpoints with random weights (no training, as in test_scoring.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import torch

from ravfm.data.schemas import CRITEO_CAT, CRITEO_INT

CRITEO_RAW = ("label", *CRITEO_INT, *CRITEO_CAT)


def head_file(src: Path, out: Path, lines: int, header: bool = False) -> Path:
    """The first `lines` data lines of `src` (after its header, kept) as a new file."""
    with open(src) as f:
        text = [next(f) for _ in range(lines + int(header))]
    out.write_text("".join(text))
    return out


def criteo_rows(path: Path) -> list[dict]:
    """Each line of a raw Criteo file as a request row: ints as JSON numbers, codes as text,
    empty fields as null, the label kept (the server ignores it)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        row = {}
        for col, v in zip(CRITEO_RAW, line.split("\t")):
            if col.startswith("I") or col == "label":
                row[col] = int(v) if v else None
            else:
                row[col] = v or None
        rows.append(row)
    return rows


def avazu_rows(path: Path) -> list[dict]:
    """Each row of a raw Avazu CSV as a request row: hour as a number, the rest as text."""
    with open(path, newline="") as f:
        return [{k: int(v) if k == "hour" else v for k, v in r.items()} for r in csv.DictReader(f)]


def movielens_rows(path: Path) -> list[dict]:
    """Each line of a u.data-style file (user, item, rating, timestamp) as a request row."""
    rows = []
    for line in Path(path).read_text().splitlines():
        u, i, r, t = line.split("\t")
        rows.append({"user_id": int(u), "item_id": int(i), "rating": float(r), "timestamp": int(t)})
    return rows


def columnar(rows: list[dict]) -> dict[str, list]:
    return {c: [r.get(c) for r in rows] for c in rows[0]}


def shard_frame(shards: Path, split: str = "test") -> pl.DataFrame:
    from ravfm.data.index import split_paths

    return pl.concat([pl.read_parquet(p) for p in split_paths(shards, split)])


def make_checkpoint(
    root: Path,
    step: int,
    spec_dir: Path,
    model_name: str = "fm",
    seed: int = 1,
    task: str = "binary",
    history: dict | None = None,
) -> Path:
    """A checkpoint of a model with random weights (k=4) under `root` (runs/NAME/checkpoints)."""
    from ravfm.config import FeatureConfig, ModelConfig, RunConfig, to_dict
    from ravfm.distributed.world import World
    from ravfm.features.spec import FeatureSpec
    from ravfm.train.checkpoint import save_checkpoint
    from ravfm.train.setup import build_for_training

    spec = FeatureSpec.load(spec_dir)
    feats = FeatureConfig(hash_bits=spec.hash_bits, id_space=spec.id_space)
    model_cfg = ModelConfig(name=model_name, k=4, init_std=0.2, task=task)
    cfg = RunConfig(name=f"serve_{model_name}", features=feats, model=model_cfg)
    torch.manual_seed(seed)
    model, _ = build_for_training(cfg, spec_dir, World.single("cpu"), n_train=1000, kind="sparse")
    manifest = {"epoch": 0, "config": to_dict(cfg), "task": task, "n_train": 1000}
    if history is not None:
        manifest["history"] = history
    return save_checkpoint(
        root,
        step,
        model=model,
        sparse_opt=None,
        dense_opt=None,
        world=None,
        manifest=manifest,
        spec_dir=spec_dir,
        keep=10,
    )
