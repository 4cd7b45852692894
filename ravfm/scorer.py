"""One scoring actor's model: a checkpoint loaded once, Arrow batches in, predictions out.

FM checkpoints score through a fused path (two embedding bags, no (B, F, K) tensor) that equals
FM.predict; its slow twin is the FM definition in tests/test_scoring.py. `ravfm.scoring` runs a
pool of these over a dataset.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)
from torch import Tensor

__all__ = ["Scorer", "FusedFM", "PREDICTION", "PREDICTION_STD", "PREDICTION_STD_MODEL"]

PREDICTION = "prediction"
PREDICTION_STD = "prediction_std"  # of the observed target (ratings: posterior + noise)
PREDICTION_STD_MODEL = "prediction_std_model"  # of the model's output under the posterior


class FusedFM:
    """FM inference as embedding bags (Rendle 2010, eq. 5 in its O(F K) form).

    With rows [w_i, v_i] and x the values: sum_i x_i [w_i, v_i] is one weighted bag (B, K+1),
    and sum_i x_i^2 |v_i|^2 another over the precomputed row norms (N, 1), so
    y = w0 + sum_i x_i w_i + (|sum_i x_i v_i|^2 - sum_i x_i^2 |v_i|^2) / 2.
    The rows are stored as [w_i, v_i, |v_i|^2] (N, K+2): when every x is 0 or 1 (one-hot
    fields, Criteo, Avazu) x^2 = x and a single bag gives all three sums.
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        sq = weight[:, 1:].pow(2).sum(1, keepdim=True)  # (N, 1)
        self.rows = torch.cat([weight, sq], 1).contiguous()  # (N, K+2)
        self.sq = sq.contiguous()  # (N, 1), for values other than 0 and 1
        self.bias = bias.reshape(())

    @classmethod
    def from_model(cls, model: Any) -> FusedFM | None:
        """A FusedFM holding the model's rows, or None when `model` is not a plain FM."""
        from ravfm.model.fm import FM

        if type(model) is not FM:
            return None
        ids, rows = model.table.export_rows()
        weight = torch.zeros(
            model.table.num_rows, rows.shape[1], dtype=torch.float32, device=rows.device
        )
        weight.index_copy_(0, ids.to(rows.device), rows.float())
        return cls(weight, model.bias.detach().float())

    @torch.no_grad()
    def __call__(self, ids: Tensor, values: Tensor) -> Tensor:
        """ids (B, F) int64, values (B, F) float32 -> raw (B,)."""
        x = values.to(self.rows.dtype)
        s = F.embedding_bag(ids, self.rows, per_sample_weights=x, mode="sum")  # (B, K+2)
        if bool(((x == 0) | (x == 1)).all()):
            q = s[:, -1]  # sum x |v|^2 = sum x^2 |v|^2
        else:
            q = F.embedding_bag(ids, self.sq, per_sample_weights=x * x, mode="sum")[:, 0]
        v = s[:, 1:-1]
        return self.bias + s[:, 0] + 0.5 * (v.pow(2).sum(1) - q)


class Scorer:
    """One actor's model: Arrow batch (B rows) -> Arrow table (B rows) of kept columns and
    predictions. Loads the checkpoint once, in the constructor (meta: its manifest, when the
    caller already read and verified it).

    VFM's two standard deviations (README, "Uncertainty"): `prediction_std_model` is the
    posterior's, of the predicted rating or of the click probability (delta method:
    p (1 - p) times the std of the logit); `prediction_std` is of the observed target: for
    ratings sqrt(model variance + noise variance), the noise variance the checkpoint holds
    (learned, or estimated on held-out rows); for clicks it equals the model's (a click is
    0 or 1; the std is of its probability)."""

    def __init__(
        self,
        checkpoint: str,
        keep: tuple[str, ...] = (),
        device: str = "cpu",
        meta: dict | None = None,
    ) -> None:
        from ravfm.train.checkpoint import load_model

        self.model, self.spec, meta = load_model(checkpoint, device=device, meta=meta)
        self.device, self.keep = torch.device(device), tuple(keep)
        self.task = meta["task"]
        self.vfm = meta["config"]["model"]["name"] == "vfm"
        self.noise_var = float(meta.get("noise_var") or 0.0) if self.task == "regression" else 0.0
        self.fused = FusedFM.from_model(self.model)

    @torch.no_grad()
    def predict(self, ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """ids (B, F), values (B, F) -> (prediction (B,), std (B,), model std (B,)); the two
        standard deviations are None unless the model is VFM."""
        ids, values = ids.to(self.device), values.to(self.device)
        std = None
        if self.vfm:
            raw, std = self.model.predict(ids, values, return_std=True)
        elif self.fused is not None:
            raw = self.fused(ids, values)
        else:
            raw = self.model.predict(ids, values)
        if self.task == "binary":
            raw = torch.sigmoid(raw)
            if std is not None:  # delta method: the std of sigmoid(z) ~ p (1 - p) std(z)
                std = raw * (1 - raw) * std
        if std is None:
            return raw.float().cpu(), None, None
        total = (std * std + self.noise_var).sqrt()
        return raw.float().cpu(), total.float().cpu(), std.float().cpu()

    def __call__(self, table: pa.Table) -> pa.Table:
        from ravfm.features.transform import transform

        out = transform(table, self.spec)
        pred, std, model_std = self.predict(
            torch.from_numpy(out["ids"]), torch.from_numpy(out["values"])
        )
        cols = {c: table.column(c) for c in self.keep}
        cols[PREDICTION] = pa.array(pred.numpy())
        if std is not None:
            cols[PREDICTION_STD] = pa.array(std.numpy())
            cols[PREDICTION_STD_MODEL] = pa.array(model_std.numpy())
        return pa.table(cols)
