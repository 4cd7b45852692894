"""The peers' input formats (written by prepare.py), read with numpy alone, and the runners' output.

- id arrays (.npz, TorchRec and PyTorch): ids (B, F) int32 when every id fits, else int64;
  label (B,) float32; num_rows () int64, the table size N (ids lie in [0, N)).
- myFM design matrices (.npz): for each split s in (train, test) the CSR parts s_indptr (B+1,)
  int64, s_indices (nnz,) int32, s_data (nnz,) float32, s_shape (2,) int64 = (B, D), and
  s_y (B,) float32; columns (D,) int64, the ravfm id of each design column; field_of_column
  (D,) int32, the first field each column was seen in (for myFM's group_shapes).

The runners print one JSON line on stdout (`emit`); everything else they print goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = [
    "read_ids_npz",
    "read_myfm_npz",
    "read_libsvm",
    "binary_metrics",
    "ctr_args",
    "emit",
    "Stopwatch",
    "set_threads",
]


def read_ids_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """PATH -> ids (B, F) int32/int64, label (B,) float32, N."""
    with np.load(path) as z:
        return z["ids"], z["label"], int(z["num_rows"])


def read_myfm_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """PATH -> the dict of arrays described in the module docstring."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def read_libsvm(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A libSVM file of F `id:1` items per line -> ids (B, F) int64, label (B,) float32.

    The slow, literal reader the tests hold write_libsvm to; not for big files.
    """
    ids, labels = [], []
    with open(path) as f:
        for line in f:
            head, *items = line.split()
            labels.append(float(head))
            ids.append([int(item.split(":")[0]) for item in items])
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.float32)


def binary_metrics(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """label (B,) 0/1, prob (B,) -> exact AUC (rank statistic, ties averaged) and log loss."""
    y = np.asarray(label, dtype=np.float64) > 0.5
    p = np.asarray(prob, dtype=np.float64)
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2.0  # average 1-based rank of each distinct score
    ranks = mid[inv.reshape(-1)]
    pos, neg = int(y.sum()), int((~y).sum())
    auc = (ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg) if pos and neg else float("nan")
    q = np.clip(p, 1e-7, 1 - 1e-7)
    logloss = float(-np.mean(np.where(y, np.log(q), np.log1p(-q))))
    return {"auc": float(auc), "logloss": logloss}


def ctr_args(description: str, batch: int, lr: float) -> argparse.ArgumentParser:
    """The CLI both torch runners take (argparse only: parsed before torch is imported)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--train", required=True, help="train .npz (prepare.write_id_arrays)")
    ap.add_argument("--test", required=True, help="test .npz")
    ap.add_argument("--out", required=True, help="test probabilities, .npy float32")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr, help="embedding table learning rate")
    ap.add_argument("--dense-lr", type=float, default=1e-3, help="Adam's lr for the bias")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="shuffle and init seed")
    ap.add_argument("--eval-batch", type=int, default=65536)
    return ap


def set_threads(n: int) -> None:
    """Ask every math library for n threads (before torch / numpy do their own setup)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


def emit(result: dict[str, Any]) -> None:
    """Print the runner's one JSON line on stdout."""
    sys.stdout.write(json.dumps(result, default=float) + "\n")
    sys.stdout.flush()


class Stopwatch:
    """Named wall-clock intervals: `with sw("train"): ...`; sw.seconds["train"]."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Lap:
        return _Lap(self, name)


class _Lap:
    def __init__(self, sw: Stopwatch, name: str) -> None:
        self.sw, self.name = sw, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.sw.seconds[self.name] = self.sw.seconds.get(self.name, 0.0) + (
            time.perf_counter() - self.start
        )
