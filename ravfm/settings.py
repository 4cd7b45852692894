"""Process-wide settings read from the environment (one place, so tests and tools agree)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir", "in_ci", "local_cpus", "process_age"]

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


def process_age() -> float | None:
    """Seconds since this process started (from /proc; None where there is no /proc), so a
    command can report its start-up (interpreter and imports) apart from its work."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
