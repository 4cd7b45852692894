"""Process-wide settings read from the environment (one place, so tests and tools agree)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir", "in_ci"]

_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The real data samples: $RAVFM_SHARED_DATA, default ../shared/data beside the project."""
    return Path(os.environ.get("RAVFM_SHARED_DATA", _ROOT.parent / "shared" / "data"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
