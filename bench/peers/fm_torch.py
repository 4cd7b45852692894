"""What the TorchRec and plain-PyTorch runners share: the FM score, the init, the epoch loop.

FM (Rendle 2010) over F one-hot fields with value 1, one table row e_i = [v_i (K), w_i, pad]:
    logit = bias + sum_f w_f + 0.5 * (|sum_f v_f|^2 - sum_f |v_f|^2)
Loss: BCE with logits, the batch mean. Init: v ~ N(0, 0.01^2), w = 0, pad = 0, bias = 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from peer_io import Stopwatch, read_ids_npz

__all__ = ["fm_logits", "init_table_", "load_ctr", "train_epoch", "predict", "timings"]


def fm_logits(bias: torch.Tensor, e: torch.Tensor, k: int) -> torch.Tensor:
    """bias (1,), e (B, F, D >= K+1) rows [v (K), w, pad...] -> logits (B,)."""
    v = e[..., :k]  # (B, F, K)
    s = v.sum(dim=1)  # (B, K): reduce over fields, not factors
    pair = 0.5 * (s * s - (v * v).sum(dim=1)).sum(dim=1)
    return bias + e[..., k].sum(dim=1) + pair


@torch.no_grad()
def init_table_(weight: torch.Tensor, k: int, seed: int, std: float = 0.01) -> None:
    """weight (N, D): columns :K ~ N(0, std^2), the rest (linear weight, padding) 0, in place."""
    g = torch.Generator().manual_seed(seed)
    weight.zero_()
    weight[:, :k].copy_(torch.randn(weight.shape[0], k, generator=g) * std)


def load_ctr(path: str, shuffle_seed: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PATH (.npz id arrays) -> ids (B, F) int64, label (B,) float32, N; rows permuted once."""
    ids, label, n = read_ids_npz(path)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(label))
        ids, label = ids[order], label[order]
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(label), n


def train_epoch(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    label: torch.Tensor,
    batch: int,
) -> dict[str, float]:
    """Run step(ids (b, F), label (b,)) -> loss over consecutive batches of one epoch.

    Returns train_s (the whole epoch), first_batch_s and the mean loss.
    """
    losses = []
    t0 = time.perf_counter()
    first = None
    for lo in range(0, len(label), batch):
        losses.append(float(step(ids[lo : lo + batch], label[lo : lo + batch])))
        if first is None:
            first = time.perf_counter() - t0
    return {
        "train_s": time.perf_counter() - t0,
        "first_batch_s": first or 0.0,
        "train_loss": float(np.mean(losses)),
    }


@torch.no_grad()
def predict(
    score: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, batch: int
) -> np.ndarray:
    """score(ids (b, F)) -> logits (b,); returns sigmoid probabilities (B,) float32."""
    out = [torch.sigmoid(score(ids[lo : lo + batch])) for lo in range(0, len(ids), batch)]
    return torch.cat(out).numpy().astype(np.float32)


def timings(sw: Stopwatch, epochs: list[dict], rows: int, batch: int) -> dict:
    """The JSON line's timer fields from the stopwatch and each epoch's train_epoch result."""
    train_s = sum(e["train_s"] for e in epochs)
    steady_s = train_s - epochs[0]["first_batch_s"]
    steady_rows = rows * len(epochs) - min(batch, rows)
    return {
        "load_s": sw.seconds.get("load", 0.0),
        "setup_s": sw.seconds.get("setup", 0.0),
        "train_s": train_s,
        "first_batch_s": epochs[0]["first_batch_s"],
        "predict_s": sw.seconds.get("predict", 0.0),
        "samples_per_s": rows * len(epochs) / train_s,
        "samples_per_s_steady": steady_rows / steady_s if steady_s > 0 else None,
        "train_loss": [e["train_loss"] for e in epochs],
    }
