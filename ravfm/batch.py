"""The Batch passed to models: ids (B, F), values (B, F), label (B,).

Padding: a position with id 0 and value 0.0 is padding (multi-valued fields are padded to a
fixed width) and contributes nothing to any model, its loss or its regulariser. Real ids are
never 0 (the feature spec reserves row 0 of every table).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Batch", "PAD_ID", "from_numpy"]

PAD_ID = 0


@dataclass
class Batch:
    """ids: (B, F) int64 row ids; values: (B, F) float32; label: (B,) float32 (0/1 or rating);
    row: (B,) int64 source row numbers when the data carries them (exact resume), else None."""

    ids: Tensor
    values: Tensor
    label: Tensor
    row: Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.ids.to(device, non_blocking=non_blocking),
            self.values.to(device, non_blocking=non_blocking),
            self.label.to(device, non_blocking=non_blocking),
            self.row,
        )

    def slice(self, start: int, stop: int) -> Batch:
        row = None if self.row is None else self.row[start:stop]
        return Batch(self.ids[start:stop], self.values[start:stop], self.label[start:stop], row)


def from_numpy(arrays: dict[str, np.ndarray]) -> Batch:
    """Zero-copy Batch from the feature transform's output {"ids", "values", "label"[, "row"]}."""
    # Ray Data hands out read-only views of its blocks; nothing writes to a batch, so share them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    ids = np.ascontiguousarray(arrays["ids"], dtype=np.int64)
    values = np.ascontiguousarray(arrays["values"], dtype=np.float32)
    label = np.ascontiguousarray(arrays["label"], dtype=np.float32)
    row = arrays.get("row")
    row_t = None if row is None else torch.from_numpy(np.ascontiguousarray(row, dtype=np.int64))
    return Batch(torch.from_numpy(ids), torch.from_numpy(values), torch.from_numpy(label), row_t)
