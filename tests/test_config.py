from __future__ import annotations

import pytest

from ravfm.config import RunConfig, load_config, to_dict
from ravfm.errors import UserError


def test_defaults_then_yaml_then_overrides(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: demo\nmodel:\n  name: vfm\n  k: 8\ntrain:\n  epochs: 2\n")
    cfg = load_config(job, ["model.k=4", "optim.betas=[0.8, 0.9]"])
    assert cfg.name == "demo" and cfg.model.name == "vfm"
    assert cfg.model.k == 4 and cfg.train.epochs == 2
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.lr == RunConfig().optim.lr


def test_resolved_config_round_trips_through_dict():
    cfg = load_config(
        None, ["model.name=rafm", "model.rafm.ranks=[2,4,8]", "model.rafm.thresholds=[5,50]"]
    )
    from ravfm.config import from_dict

    assert from_dict(RunConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["model.kk=3"], "unknown config key model.kk"),
        (["model.k=x"], "model.k must be an integer"),
        (["model.name=gbdt"], "model.name='gbdt' is not one of fm, vfm, rafm"),
        (["model.rafm.ranks=[8,2]", "model.rafm.thresholds=[1]"], "strictly increasing"),
        (["model.rafm.ranks=[2,4,8]"], "thresholds needs 2 value(s)"),
        (["model.vfm.components=0"], "model.vfm.components=0 must be >= 1"),
        (["embedding.sharding=cols"], "embedding.sharding='cols'"),
        (["epochs=3"], "unknown config key epochs"),
        (["train"], "must look like section.key=value"),
    ],
)
def test_bad_config_is_one_clear_line(override, fragment):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_task_follows_dataset():
    assert load_config(None, ["data.dataset=movielens"]).task == "regression"
    assert load_config(None, ["data.dataset=criteo"]).task == "binary"
