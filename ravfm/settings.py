"""Process-wide settings read from the environment (one place, so tests and tools agree)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir", "in_ci", "local_cpus"]

_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The real data samples: $RAVFM_SHARED_DATA, default ../shared/data beside the project."""
    return Path(os.environ.get("RAVFM_SHARED_DATA", _ROOT.parent / "shared" / "data"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
