"""Build a rank's model from the run config and the feature spec (shared by training and eval)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ravfm.config import RunConfig
from ravfm.distributed.embedding import table_factory
from ravfm.distributed.world import World
from ravfm.features.spec import FeatureSpec
from ravfm.features.stats import load_frequencies
from ravfm.model.registry import build_model

__all__ = ["build_for_training", "early_stopping_metric", "table_kind"]


def table_kind(cfg: RunConfig, world: World) -> str:
    """rows: row-sharded across ranks; sparse: a local table with fused sparse updates."""
    return "rows" if cfg.embedding.sharding == "rows" and world.size > 1 else "sparse"


def build_for_training(
    cfg: RunConfig, spec_dir: str | Path, world: World, *, n_train: int, kind: str | None = None
) -> tuple[nn.Module, FeatureSpec]:
    spec = FeatureSpec.load(spec_dir)
    # RaFM's levels need the train frequencies; VFM's per-row KL weights use them when `stats`
    # wrote them (they shape only the training loss, never a prediction).
    need = cfg.model.name == "rafm" or (
        cfg.model.name == "vfm" and (Path(spec_dir) / "frequencies.parquet").exists()
    )
    freqs = load_frequencies(spec_dir, spec.num_rows) if need else None
    make_table = table_factory(
        kind or table_kind(cfg, world), world, dtype=torch.float32, device=world.device
    )
    model = build_model(
        cfg.model,
        num_rows=spec.num_rows,
        num_fields=spec.num_fields,
        field_index=list(spec.field_index),
        task=cfg.task,
        n_train=n_train,
        frequencies=freqs,
        make_table=make_table,
        unit_values=all(f.kind != "multi" for f in spec.fields),
    )
    return model.to(world.device), spec


def early_stopping_metric(cfg: RunConfig) -> str:
    if cfg.train.early_stopping_metric != "auto":
        return cfg.train.early_stopping_metric
    return "rmse" if cfg.task == "regression" else "auc"
