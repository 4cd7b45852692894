"""What a run tells the outside world: progress, metrics.jsonl, TensorBoard, summary.json.

Only rank 0 writes; nothing here runs a collective (a collective inside `if rank == 0` is a
deadlock). The driver tails `progress.json` to print one updating progress line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ravfm.config import RunConfig
from ravfm.distributed.world import World
from ravfm.storage import dumps

__all__ = ["Telemetry", "write_json_atomic"]


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(payload))
    os.replace(tmp, path)


class Telemetry:
    """Rank 0's logs for one run directory."""

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        world: World,
        *,
        steps_per_epoch: int,
        resumed_from: str | None,
    ) -> None:
        self.run_dir, self.cfg, self.world = Path(run_dir), cfg, world
        self.active = world.rank == 0
        self.steps_per_epoch = steps_per_epoch
        self._tb = None
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._event(
                {
                    "event": "start",
                    "world_size": world.size,
                    "device": str(world.device),
                    "resumed_from": resumed_from,
                }
            )
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; tolerate a trimmed install
                self._tb = None

    def _event(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(dumps(record, indent=None) + "\n")

    def step(self, pos: Any, state: Any, seconds: float) -> None:
        if not self.active or pos.step % max(1, self.cfg.train.log_every):
            return
        sps = pos.epoch_samples * self.world.size / max(seconds, 1e-9)
        local = state.compute()
        write_json_atomic(
            self.run_dir / "progress.json",
            {
                "epoch": pos.epoch,
                "epochs": self.cfg.train.epochs,
                "step": pos.step,
                "epoch_step": pos.epoch_samples // max(1, self.cfg.train.batch_size),
                "steps_per_epoch": self.steps_per_epoch,
                "samples_per_s": sps,
                "train_rank0": {k: v for k, v in local.items() if k in ("logloss", "auc", "rmse")},
            },
        )
        if self._tb is not None:
            self._tb.add_scalar("train/samples_per_s", sps, pos.step)
            for k in ("logloss", "auc", "rmse"):
                if local.get(k) is not None:
                    self._tb.add_scalar(f"train_rank0/{k}", local[k], pos.step)

    def epoch(self, pos: Any, train: dict, valid: dict, seconds: float) -> None:
        if not self.active:
            return
        sps = train.get("n", 0) / max(seconds, 1e-9)
        self._event(
            {
                "event": "epoch",
                "epoch": pos.epoch,
                "step": pos.step,
                "train": train,
                "valid": valid,
                "seconds": seconds,
                "samples_per_s": sps,
            }
        )
        write_json_atomic(
            self.run_dir / "progress.json",
            {
                "epoch": pos.epoch,
                "epochs": self.cfg.train.epochs,
                "step": pos.step,
                "steps_per_epoch": self.steps_per_epoch,
                "samples_per_s": sps,
                "epoch_done": {"train": train, "valid": valid},
            },
        )
        if self._tb is not None:
            for split, m in (("train", train), ("valid", valid)):
                for k in ("logloss", "auc", "rmse", "mae"):
                    if m.get(k) is not None:
                        self._tb.add_scalar(f"{split}/{k}", m[k], pos.epoch)
            self._tb.add_scalar("train/epoch_samples_per_s", sps, pos.epoch)
            self._tb.flush()

    def finish(self, test: dict, history: dict, extra: dict) -> dict:
        summary = {
            "name": self.cfg.name,
            "model": self.cfg.model.name,
            "task": self.cfg.task,
            "world_size": self.world.size,
            "test": test,
            **extra,
            "epochs": history.get("epochs", []),
            "best_valid": history.get("best"),
            "restarts": history.get("restarts", []),
        }
        if self.active:
            self._event({"event": "test", "test": test, **extra})
            write_json_atomic(self.run_dir / "summary.json", summary)
            if self._tb is not None:
                for k, v in test.items():
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"test/{k}", v, 0)
                self._tb.close()
        return summary
