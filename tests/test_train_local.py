"""`ravfm train` with one worker on this machine: the epoch loop in this process, no Ray."""

from __future__ import annotations

import json

import pytest

from ravfm.cli import main
from ravfm.config import load_config
from ravfm.driver import evaluate, train

pytestmark = pytest.mark.slow


def _cfg(tmp, shared_data, name, *extra):
    return load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={tmp / 'runs'}",
            "data.dataset=criteo",
            f"data.source={shared_data / 'criteo' / 'dac_sample_8k.txt'}",
            f"data.shards={tmp / 'shards'}",
            "data.rows_per_shard=2000",
            "features.hash_bits=16",
            "model.k=4",
            "train.epochs=2",
            "train.batch_size=512",
            "train.eval_batch_size=1000",
            "optim.sparse=adam",
            "optim.lr=0.005",
            *extra,
        ],
    )


def test_one_worker_trains_in_this_process_and_eval_agrees(tmp_path, shared_data, capsys):
    summary = train(_cfg(tmp_path, shared_data, "loc"))
    err = capsys.readouterr().err
    assert "in this process" in err and "no Ray" in err
    assert summary["engine"] == "local" and summary["world_size"] == 1
    index = json.loads((tmp_path / "shards" / "_index.json").read_text())
    for e in summary["epochs"]:
        assert e["seen"] == index["splits"]["train"]["rows"]  # every train row once per epoch
        assert e["train"]["n"] == index["splits"]["train"]["rows"]
    test = summary["test"]
    assert test["n"] == index["splits"]["test"]["rows"] and 0.6 < test["auc"] < 1
    on_disk = json.loads((tmp_path / "runs" / "loc" / "summary.json").read_text())
    assert on_disk["test"]["auc"] == test["auc"]
    again = evaluate(str(tmp_path / "runs" / "loc" / "checkpoints"), split="test")
    assert again["n"] == test["n"] and again["auc"] == pytest.approx(test["auc"], abs=1e-9)
    assert again["logloss"] == pytest.approx(test["logloss"], rel=1e-6)


def test_a_worse_last_epoch_is_replaced_by_the_best_one(tmp_path, shared_data):
    """The learning rate jumps 200x after the first epoch: valid gets worse, patience ends the
    run, and the test metrics and final checkpoint are the first epoch's."""
    from ravfm.train.checkpoint import load_model, read_manifest

    cfg = _cfg(tmp_path, shared_data, "best", "train.epochs=4", "optim.schedule=step",
               "optim.step_gamma=200", "train.early_stopping_patience=1", "train.keep_checkpoints=1")  # fmt: skip
    summary = train(cfg)
    assert len(summary["epochs"]) == 2 and summary["best_epoch"] == 0
    assert summary["restored_best"]["epoch"] == 0
    assert summary["epochs"][1]["valid"]["auc"] < summary["epochs"][0]["valid"]["auc"]
    final = read_manifest(str(tmp_path / "runs" / "best" / "checkpoints"))
    assert final["history"]["restored_best"]["epoch"] == 0
    best_dir = tmp_path / "runs" / "best" / "checkpoints" / final["history"]["best_checkpoint"]
    assert best_dir.is_dir()  # kept though keep_checkpoints=1: it is the best
    a, _, _ = load_model(str(best_dir))
    b, _, _ = load_model(final["path"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert x.equal(y), name
    again = evaluate(final["path"], split="test")
    assert again["auc"] == pytest.approx(summary["test"]["auc"], abs=1e-9)


def test_ratings_in_a_libsvm_file_train_as_regression(tmp_path, capsys):
    lines = [f"{1 + i % 5} {i % 7}:1 {10 + i % 11}:1 {30 + i % 3}:1" for i in range(600)]
    src = tmp_path / "ratings.libfm"
    src.write_text("\n".join(lines) + "\n")
    base = [
        f"runs_dir={tmp_path / 'runs'}",
        "data.dataset=libsvm",
        f"data.source={src}",
        f"data.shards={tmp_path / 'shards'}",
        "train.batch_size=64",
    ]
    summary = train(load_config(None, ["name=r", *base]))
    assert summary["task"] == "regression" and "rmse" in summary["test"]
    code = main(["train", "name=r2", *base, "model.task=binary"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ravfm train: error: model.task=binary but")
    assert "ratings" in err[-1]


def test_eval_on_another_datasets_shards_is_one_line(tmp_path, shared_data, capsys):
    train(_cfg(tmp_path, shared_data, "ev", "train.epochs=1"))
    from ravfm.data.convert import convert

    convert("avazu", str(shared_data / "avazu" / "avazu_sample_9k.csv"), str(tmp_path / "av"))
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "runs" / "ev" / "checkpoints"), "--shards",
                 str(tmp_path / "av")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and "avazu shards but the feature spec is for criteo" in err[0]
    )


def test_resuming_with_another_sparse_optimizer_is_refused_before_training(
    tmp_path, shared_data, capsys
):
    train(_cfg(tmp_path, shared_data, "opt", "train.epochs=1"))
    capsys.readouterr()
    code = main([
        "train", "--resume", str(tmp_path / "runs" / "opt" / "checkpoints"),
        "name=opt", f"runs_dir={tmp_path / 'runs'}", f"data.shards={tmp_path / 'shards'}",
        "features.hash_bits=16", "model.k=4", "optim.sparse=adagrad", "train.epochs=2",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "optim.sparse='adam'" in err[-1] and "resume with" in err[-1]
