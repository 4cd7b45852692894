"""jobs/*.yaml: every job loads and validates, names are unique, the smoke job is small."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ravfm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
EXPECTED = {
    "criteo_fm": ("criteo", "fm"),
    "criteo_rafm": ("criteo", "rafm"),
    "avazu_fm": ("avazu", "fm"),
    "avazu_rafm": ("avazu", "rafm"),
    "movielens_fm": ("movielens", "fm"),
    "movielens_vfm": ("movielens", "vfm"),
    "frappe_rafm": ("libsvm", "rafm"),
    "smoke": ("criteo", "fm"),
}


def test_every_expected_job_exists():
    assert {p.stem for p in JOBS} >= set(EXPECTED)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_loads_and_matches_its_file_name(path):
    cfg = load_config(path)
    assert cfg.name == path.stem, "a job's name is its file name, so runs/<name> is predictable"
    if path.stem in EXPECTED:
        assert (cfg.data.dataset, cfg.model.name) == EXPECTED[path.stem]


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_is_commented_section_by_section(path):
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each job opens with a comment saying what it trains"
    tree = yaml.safe_load(text)
    sections = [k for k, v in tree.items() if isinstance(v, dict)]
    commented = sum(1 for line in text.splitlines() if "#" in line)
    assert commented >= len(sections), f"{path.name}: comment the sections"


def test_job_names_are_unique():
    names = [load_config(p).name for p in JOBS]
    assert len(names) == len(set(names))


def test_rafm_jobs_keep_k_equal_to_the_largest_rank():
    for p in JOBS:
        cfg = load_config(p)
        if cfg.model.name == "rafm":
            assert cfg.model.k == cfg.model.rafm.ranks[-1], p.name


def test_click_jobs_default_to_synthetic_data():
    for name in (
        "criteo_fm",
        "criteo_rafm",
        "avazu_fm",
        "avazu_rafm",
        "movielens_fm",
        "movielens_vfm",
        "smoke",
    ):
        assert load_config(ROOT / "jobs" / f"{name}.yaml").data.source is None, name


def test_smoke_job_is_small():
    cfg = load_config(ROOT / "jobs" / "smoke.yaml")
    assert cfg.data.source is None and cfg.data.synth_rows <= 10_000
    assert cfg.train.epochs == 1 and cfg.features.hash_bits <= 16 and cfg.model.k <= 8
    assert cfg.train.num_workers == 2
    assert cfg.data.synth_rows // cfg.data.rows_per_shard >= cfg.train.num_workers


def test_makefile_style_source_override_applies():
    cfg = load_config(ROOT / "jobs" / "criteo_fm.yaml", ["data.source=s3://bucket/train.txt.gz"])
    assert cfg.data.source == "s3://bucket/train.txt.gz"


def test_frappe_job_points_at_the_real_sample(shared_data):
    if shared_data.resolve() != (ROOT.parent / "shared" / "data").resolve():
        pytest.skip(
            "RAVFM_SHARED_DATA moves the samples; the job's relative path assumes ../shared"
        )
    cfg = load_config(ROOT / "jobs" / "frappe_rafm.yaml")
    src = (ROOT / cfg.data.source).resolve()
    assert src == (shared_data / "frappe" / "frappe.validation.libfm").resolve()
    assert src.is_file()
