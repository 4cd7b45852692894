"""Worker sizing from the cluster's resources: room is left for Ray Data's ingest tasks."""

from __future__ import annotations

import pytest

from ravfm.config import load_config
from ravfm.driver import plan_workers
from ravfm.errors import UserError


def _plan(cpus: float, *overrides: str, gpus: float = 0) -> dict:
    return plan_workers(load_config(None, list(overrides)), {"CPU": cpus, "GPU": gpus})


@pytest.mark.parametrize(
    ("cpus", "overrides", "want"),
    [
        (2, (), {"num_workers": 1, "cpus_per_worker": 1.0, "threads": 1}),
        (2, ("train.num_workers=2",), {"num_workers": 2, "cpus_per_worker": 0.5, "threads": 1}),
        (16, (), {"num_workers": 4, "cpus_per_worker": 2.0, "threads": 2}),
        (64, (), {"num_workers": 16, "cpus_per_worker": 2.0, "threads": 2}),
        (
            8,
            ("train.cpus_per_worker=3", "train.num_workers=2"),
            {"cpus_per_worker": 3.0, "threads": 3},
        ),
    ],
)
def test_workers_leave_half_the_cpus_to_ingest_and_threads_match_own_cpus(cpus, overrides, want):
    plan = _plan(cpus, *overrides)
    assert {k: plan[k] for k in want} == want
    assert plan["num_workers"] * plan["cpus_per_worker"] <= cpus
    assert plan["threads"] <= max(1, plan["cpus_per_worker"])  # never more threads than CPUs


def test_impossible_sizing_and_missing_gpu_are_one_clear_line():
    with pytest.raises(UserError, match=r"exceeds the cluster's 2 CPUs"):
        _plan(2, "train.num_workers=3", "train.cpus_per_worker=1")
    with pytest.raises(UserError, match=r"has no GPU"):
        _plan(2, "train.use_gpu=true")
