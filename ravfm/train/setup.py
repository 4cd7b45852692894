"""Build a rank's model from the run config and the feature spec (shared by training and eval)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ravfm.config import RunConfig
from ravfm.distributed.embedding import table_factory
from ravfm.distributed.world import World
from ravfm.features.spec import FeatureSpec
from ravfm.features.stats import FREQ_NAME, load_frequencies
from ravfm.model.registry import build_model
from ravfm.storage import Store

__all__ = ["build_for_training", "early_stopping_metric", "table_kind", "start_from_labels"]


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
        cfg.model.name == "vfm" and Store(str(spec_dir)).exists(FREQ_NAME)
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
    start_from_labels(model, spec.label_stats, cfg.task)
    return model.to(world.device), spec


@torch.no_grad()
def start_from_labels(model: nn.Module, labels: dict, task: str) -> None:
    """The global bias starts at the train labels' mean (ratings) or its logit (clicks), so
    the first steps need not walk it there; ratings are predicted within [min, max] of the
    train targets (libFM's rule). A checkpoint, when loaded, overrides both."""
    if not labels or not labels.get("n"):
        return
    mean = float(labels["mean"])
    if task == "binary":
        p = min(max(mean, 1e-4), 1 - 1e-4)
        start = math.log(p / (1 - p))
    else:
        start = mean
        model.output_range.copy_(torch.tensor([float(labels["min"]), float(labels["max"])]))
    bias = model.bias_mu if hasattr(model, "bias_mu") else model.bias
    bias.fill_(start)


def early_stopping_metric(cfg: RunConfig) -> str:
    if cfg.train.early_stopping_metric != "auto":
        return cfg.train.early_stopping_metric
    return "rmse" if cfg.task == "regression" else "auc"
