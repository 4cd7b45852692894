"""Build the configured model: `build_model(cfg.model, ...)` -> FM, VFM or RaFM."""

from __future__ import annotations

import numpy as np
from torch import nn

from ravfm.config import ModelConfig
from ravfm.errors import UserError
from ravfm.model.fm import FM
from ravfm.model.layers import TableFactory
from ravfm.model.losses import TASKS
from ravfm.model.rafm import RaFM, rafm_levels
from ravfm.model.vfm import VFM

__all__ = ["build_model", "rafm_levels"]


def build_model(
    cfg: ModelConfig,
    *,
    num_rows: int,
    num_fields: int,
    field_index: list[int],
    task: str,
    n_train: int,
    frequencies: np.ndarray | None = None,
    make_table: TableFactory | None = None,
    unit_values: bool = False,
) -> nn.Module:
    """The model `cfg.name` over a table of `num_rows` rows for batches of `num_fields` columns.

    field_index (F,): the field (VFM prior group) of each column; frequencies (N,) int64: each
    row's count in train (RaFM levels, VFM KL weights); make_table: the table factory
    (default: plain single-process tables); unit_values: every value is 0 or 1 (no multi-valued
    field), which lets FM take its L2 terms from the same fused lookup.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    if len(field_index) != num_fields:
        raise ValueError(f"field_index has {len(field_index)} entries for {num_fields} columns")
    if frequencies is not None and len(frequencies) != num_rows:
        raise ValueError(f"frequencies has {len(frequencies)} entries for {num_rows} rows")
    common = dict(make_table=make_table, init_std=cfg.init_std)
    if cfg.name == "fm":
        return FM(
            num_rows, cfg.k, l2_linear=cfg.l2_linear, l2_factors=cfg.l2_factors,
            unit_values=unit_values, **common,
        )  # fmt: skip
    if cfg.name == "vfm":
        v = cfg.vfm
        return VFM(
            num_rows,
            cfg.k,
            field_index,
            n_train=n_train,
            frequencies=frequencies,
            init_logvar=v.init_logvar,
            lambda_bias=v.lambda_bias,
            lambda_linear=v.lambda_linear,
            lambda_latent=v.lambda_latent,
            train_samples=v.train_samples,
            learn_noise=v.learn_noise,
            components=v.components,
            **common,
        )
    if cfg.name == "rafm":
        if frequencies is None:
            raise UserError(
                "model.name=rafm needs the train frequency table to assign rank levels; "
                "compute feature stats on the train split first (ravfm stats)"
            )
        r = cfg.rafm
        return RaFM(
            num_rows,
            r.ranks,
            rafm_levels(frequencies, r.thresholds),
            l2_linear=cfg.l2_linear,
            l2_factors=cfg.l2_factors,
            distill_weight=r.distill_weight,
            **common,
        )
    raise ValueError(f"unknown model {cfg.name!r}")
