"""End to end on a local Ray cluster: the Criteo sample through convert, stats and 2 CPU workers."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(tmp, shared_data, name, *extra):
    from ravfm.config import load_config

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
            "model.k=8",
            "train.epochs=1",
            "train.batch_size=256",
            "train.eval_batch_size=2048",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "embedding.sharding=rows",
            "optim.lr=0.05",
            *extra,
        ],
    )


def test_two_workers_train_report_checkpoint_and_resume_on_one(ray_local, tmp_path, shared_data):
    from ravfm.driver import evaluate, train

    summary = train(_cfg(tmp_path, shared_data, "e2e"))
    run = tmp_path / "runs" / "e2e"
    test = summary["test"]
    assert summary["world_size"] == 2
    assert 0.6 < test["auc"] <= 1.0 and math.isfinite(test["logloss"]) and test["logloss"] < 0.6
    assert json.loads((run / "summary.json").read_text())["test"]["auc"] == test["auc"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "start"] == ["epoch", "test"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert len(list(ckpt.glob("rows-*-of-00002.safetensors"))) == 2

    # One process holding every row re-partitions the two ranks' rows: same test metrics.
    one = evaluate(str(ckpt), split="test", shards=str(tmp_path / "shards"))
    assert one["n"] == test["n"] and one["auc"] == pytest.approx(test["auc"], abs=1e-6)
    assert one["logloss"] == pytest.approx(test["logloss"], rel=1e-5)

    # Resume the 2-worker run for a second epoch on 1 worker.
    cfg2 = _cfg(
        tmp_path,
        shared_data,
        "e2e",
        "train.epochs=2",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
    )
    resumed = train(cfg2, resume=str(run / "checkpoints"))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]
    assert resumed["world_size"] == 1 and resumed["test"]["auc"] > 0.6


def test_rerunning_a_name_with_checkpoints_asks_for_resume(ray_local, tmp_path, shared_data):
    from ravfm.driver import train
    from ravfm.errors import UserError

    (tmp_path / "runs" / "again" / "checkpoints" / "step-000000001").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds checkpoints; pass --resume"):
        train(_cfg(tmp_path, shared_data, "again"))


def test_killed_worker_restarts_from_checkpoint_and_sees_every_sample(
    ray_local, tmp_path, shared_data, monkeypatch
):
    from ravfm.driver import train

    marker = tmp_path / "killed"
    monkeypatch.setenv("RAVFM_FAULT_KILL_STEP", "7:1")
    monkeypatch.setenv("RAVFM_FAULT_MARKER", str(marker))
    cfg = _cfg(
        tmp_path,
        shared_data,
        "chaos",
        "train.max_failures=2",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.shuffle_buffer=0",
    )
    summary = train(cfg)
    assert marker.exists(), "the fault was not injected"
    index = json.loads((tmp_path / "shards" / "_index.json").read_text())
    n_train = index["splits"]["train"]["rows"]
    epoch = summary["epochs"][0]
    assert epoch["seen"] == n_train  # no sample lost
    (restart,) = summary["restarts"]
    assert restart["from_step"] == 6
    assert restart["repeated_samples_at_most"] <= 3 * 256 * 2  # the checkpoint interval


def test_vfm_mixture_trains_row_sharded_on_two_workers(ray_local, tmp_path, shared_data):
    """A three-component VFM (rows three blocks wide) through the sharded trainer; one process
    holding every row gives the same test metrics."""
    from ravfm.driver import evaluate, train

    cfg = _cfg(tmp_path, shared_data, "mix", "model.name=vfm", "model.init_std=0.05",
               "model.vfm.init_logvar=-6", "model.vfm.components=3")  # fmt: skip
    summary = train(cfg)
    test = summary["test"]
    assert summary["world_size"] == 2 and 0.6 < test["auc"] <= 1.0
    ckpt = sorted((tmp_path / "runs" / "mix" / "checkpoints").glob("step-*"))[-1]
    one = evaluate(str(ckpt), split="test", shards=str(tmp_path / "shards"))
    assert one["auc"] == pytest.approx(test["auc"], abs=1e-6)


def _odd_source(tmp, shared_data):
    """7,109 Criteo lines: split sizes (5,687 / 719 / 703) that W = 2 and 3 do not divide."""
    src = tmp / "odd.txt"
    lines = (shared_data / "criteo" / "dac_sample_8k.txt").read_text().splitlines(True)
    src.write_text("".join(lines[:7109]))
    return src


@pytest.mark.parametrize("workers", [2, 3])
def test_every_row_is_trained_and_evaluated_once_for_any_worker_count(
    ray_local, tmp_path, shared_data, workers
):
    from ravfm.driver import evaluate, train

    src = _odd_source(tmp_path, shared_data)
    cfg = _cfg(tmp_path, shared_data, f"w{workers}", f"data.source={src}",
               f"train.num_workers={workers}", "train.cpus_per_worker=0.5")  # fmt: skip
    summary = train(cfg)
    index = json.loads((tmp_path / "shards" / "_index.json").read_text())
    n = {s: index["splits"][s]["rows"] for s in ("train", "valid", "test")}
    assert n["train"] % workers and n["test"] % workers  # sizes the ranks cannot share evenly
    assert summary["world_size"] == workers
    epoch = summary["epochs"][0]
    assert epoch["seen"] == epoch["train"]["n"] == n["train"]
    assert epoch["valid"]["n"] == n["valid"] and summary["test"]["n"] == n["test"]
    ckpt = str(tmp_path / "runs" / f"w{workers}" / "checkpoints")
    one = evaluate(ckpt, split="test")
    assert one["n"] == n["test"] and one["auc"] == pytest.approx(summary["test"]["auc"], abs=1e-6)
    assert one["logloss"] == pytest.approx(summary["test"]["logloss"], rel=1e-5)


def test_one_ray_worker_gives_the_model_of_the_one_process_path(ray_local, tmp_path, shared_data):
    """The same loop over the same batches: Ray Data (in a Ray Train worker) and this process's
    threads yield the same rows in the same order, so the runs agree."""
    from ravfm.driver import train
    from ravfm.train.checkpoint import load_model

    common = ("train.num_workers=1", "train.cpus_per_worker=1", "train.epochs=2",
              "embedding.sharding=replicated", "train.shuffle_buffer=1500")  # fmt: skip
    on_ray = train(_cfg(tmp_path, shared_data, "viaray", *common, "train.engine=ray"))
    local = train(_cfg(tmp_path, shared_data, "vialocal", *common, "train.engine=local"))
    assert on_ray["engine"] == "ray" and local["engine"] == "local"
    for a, b in zip(on_ray["epochs"], local["epochs"]):
        for split in ("train", "valid"):
            for k in ("n", "logloss", "auc"):
                assert a[split][k] == pytest.approx(b[split][k], rel=1e-6, abs=1e-9), (split, k)
    assert on_ray["test"]["auc"] == pytest.approx(local["test"]["auc"], abs=1e-9)
    ma, _, _ = load_model(str(tmp_path / "runs" / "viaray" / "checkpoints"))
    mb, _, _ = load_model(str(tmp_path / "runs" / "vialocal" / "checkpoints"))
    for (name, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)
