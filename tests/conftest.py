"""Shared fixtures: the real data samples (skip outside CI when absent, fail in CI)."""

from __future__ import annotations

import pytest

from ravfm.settings import in_ci, shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (or $RAVFM_SHARED_DATA)."""
    root = shared_data_dir()
    if not root.is_dir():
        msg = f"real data samples not found at {root}; set RAVFM_SHARED_DATA"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for one test module, shut down after it."""
    import ray

    from ravfm.connect import init_ray

    init_ray(None)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
