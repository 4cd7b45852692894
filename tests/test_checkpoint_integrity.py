"""Checkpoints are verified before use: a missing, truncated or altered file is refused by name,
and choosing the newest checkpoint of a run skips damaged or incomplete ones, saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ravfm.config import FeatureConfig, ModelConfig, RunConfig, to_dict
from ravfm.data.schemas import CRITEO
from ravfm.distributed.optim import build_optimizers
from ravfm.distributed.world import World
from ravfm.errors import UserError
from ravfm.features.spec import build_spec
from ravfm.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_manifest,
    save_checkpoint,
)
from ravfm.train.setup import build_for_training


def _run(tmp: Path, steps: tuple[int, ...] = (1, 2)):
    feats = FeatureConfig(hash_bits=8)
    spec_dir = tmp / "spec"
    build_spec({"dataset": "criteo", "schema": CRITEO.columns, "label": "label"}, feats).save(
        spec_dir
    )
    cfg = RunConfig(name="ck", features=feats, model=ModelConfig(k=4, init_std=0.1))
    world = World.single()
    model, _ = build_for_training(cfg, spec_dir, world, n_train=100, kind="sparse")
    sparse, dense = build_optimizers(model, cfg.optim)
    root = tmp / "checkpoints"
    for step in steps:
        with torch.no_grad():
            model.bias.fill_(float(step))
        save_checkpoint(
            str(root),
            step,
            model=model,
            sparse_opt=sparse,
            dense_opt=dense,
            world=world,
            manifest={"epoch": 0, "config": to_dict(cfg), "task": "binary", "n_train": 100},
            spec_dir=str(spec_dir),
            keep=5,
        )
    return root, model, sparse, dense


def _newest(root: Path) -> Path:
    return sorted(root.glob("step-*"))[-1]


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    root, *_ = _run(tmp_path, steps=(1,))
    ckpt = _newest(root)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {
        str(p.relative_to(ckpt))
        for p in ckpt.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(files) == on_disk
    for name, entry in files.items():
        assert entry["bytes"] == (ckpt / name).stat().st_size and len(entry["sha256"]) == 64
    assert read_manifest(str(root))["path"] == str(ckpt)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
@pytest.mark.parametrize(
    "victim", ["rows-00000-of-00001.safetensors", "dense.safetensors", "dense_optim.safetensors",
               "spec/feature_spec.json"],
)  # fmt: skip
def test_a_damaged_file_is_refused_by_name(tmp_path, damage, victim):
    root, model, sparse, dense = _run(tmp_path, steps=(1,))
    path = _newest(root) / victim
    data = path.read_bytes()
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    with pytest.raises(UserError, match=victim.split("/")[-1]) as err:
        load_checkpoint(str(_newest(root)), model=model, sparse_opt=sparse, dense_opt=dense)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no usable checkpoint"):
        load_model(str(root))  # the run's only checkpoint is damaged


def test_latest_skips_damaged_and_incomplete_checkpoints_and_says_which(tmp_path, capsys):
    root, *_ = _run(tmp_path, steps=(1, 2, 3))
    steps = sorted(root.glob("step-*"))
    (steps[2] / "manifest.json").unlink()  # step 3: a write that never finished
    rows = steps[1] / "rows-00000-of-00001.safetensors"
    rows.write_bytes(rows.read_bytes()[:100])  # step 2: truncated
    assert latest_checkpoint(str(root)) == str(steps[0])
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and steps[2].name in err and "incomplete" in err
    assert steps[1].name in err and "truncated" in err
    assert f"using checkpoint {steps[0]}" in err
    model, _, meta = load_model(str(root))
    assert meta["step"] == 1 and float(model.bias.detach()) == 1.0


def test_a_manifest_that_lists_fewer_rows_files_than_ranks_is_refused(tmp_path):
    root, *_ = _run(tmp_path, steps=(1,))
    ckpt = _newest(root)
    meta = json.loads((ckpt / "manifest.json").read_text())
    meta["world_size"] = 2
    (ckpt / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="every rank's rows"):
        read_manifest(str(ckpt))
