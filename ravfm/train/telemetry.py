"""What a run tells the outside world: progress, metrics.jsonl, TensorBoard, summary.json.

Only rank 0 writes; nothing here runs a collective (a collective inside `if rank == 0` is a
deadlock). Files go to the run's storage (a local directory or an fsspec URL; TensorBoard
events are written locally and uploaded at each epoch's end when the run lives in an object
store). A host may pass `show`, which receives each progress line (the one-process path prints
them itself; the Ray driver renders progress.json with `progress_line`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ravfm.config import RunConfig
from ravfm.distributed.world import World
from ravfm.storage import Store, dumps

__all__ = ["Telemetry", "progress_line", "ProgressPrinter"]


def progress_line(p: dict) -> str:
    """One line from a progress payload: epoch, step, share of the epoch, speed, metrics."""
    done = p.get("epoch_done")
    m = (done or {}).get("valid") or p.get("train_rank0") or {}
    where = "valid" if done else "train"
    frac = 1.0 if done else min(1.0, p.get("epoch_step", 0) / max(1, p["steps_per_epoch"]))
    metrics = " ".join(
        f"{k} {m[k]:.4f}" for k in ("logloss", "auc", "rmse") if isinstance(m.get(k), float)
    )
    return (
        f"epoch {p['epoch'] + 1}/{p['epochs']} step {p['step']:,} ({100 * frac:3.0f}% of epoch) "
        f"{p['samples_per_s']:,.0f} samples/s {where} {metrics}"
    )


class ProgressPrinter:
    """Prints progress lines: one updating line on a terminal, else a line every 30 s."""

    def __init__(self) -> None:
        self.tty, self.last, self.last_time = sys.stderr.isatty(), "", 0.0

    def __call__(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            sys.stderr.flush()
        elif line != self.last and time.time() - self.last_time > 30:
            print(line, file=sys.stderr, flush=True)
            self.last_time = time.time()
        self.last = line

    def close(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Telemetry:
    """Rank 0's logs for one run directory (local path or storage URL)."""

    def __init__(
        self,
        run_dir: str,
        cfg: RunConfig,
        world: World,
        *,
        steps_per_epoch: int,
        start: dict,
        show: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.cfg, self.world = Store(run_dir), cfg, world
        self.active = world.rank == 0
        self.steps_per_epoch, self.show = steps_per_epoch, show
        self._tb, self._tb_dir, self._events = None, None, []
        if not self.active:
            return
        self.store.makedirs()
        if self.store.local:
            self._tb_dir = self.store.path("tensorboard")
        else:
            self._tb_dir = tempfile.mkdtemp(prefix="ravfm-tb-")
        self._event({"event": "start", "world_size": world.size, "device": str(world.device),
                     **start})  # fmt: skip
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)
        except ImportError:  # tensorboard is a dependency; tolerate a trimmed install
            self._tb = None

    def _event(self, record: dict) -> None:
        line = dumps({"time": time.time(), **record}, indent=None) + "\n"
        if self.store.local:
            with open(self.store.path("metrics.jsonl"), "a") as f:
                f.write(line)
        else:  # objects cannot be appended to: rewrite the (small) file whole
            self._events.append(line)
            self.store.write_bytes("metrics.jsonl", "".join(self._events).encode())

    def _progress(self, payload: dict) -> None:
        self.store.write_json("progress.json", payload)
        if self.show is not None:
            self.show(progress_line(payload))

    def step(self, pos: Any, state: Any, seconds: float) -> None:
        if not self.active or pos.step % max(1, self.cfg.train.log_every):
            return
        sps = pos.epoch_samples * self.world.size / max(seconds, 1e-9)
        local = state.compute()
        self._progress(
            {
                "epoch": pos.epoch,
                "epochs": self.cfg.train.epochs,
                "step": pos.step,
                "epoch_step": pos.epoch_samples // max(1, self.cfg.train.batch_size),
                "steps_per_epoch": self.steps_per_epoch,
                "samples_per_s": sps,
                "train_rank0": {k: v for k, v in local.items() if k in ("logloss", "auc", "rmse")},
            }
        )
        if self._tb is not None:
            self._tb.add_scalar("train/samples_per_s", sps, pos.step)
            for k in ("logloss", "auc", "rmse"):
                if local.get(k) is not None:
                    self._tb.add_scalar(f"train_rank0/{k}", local[k], pos.step)

    def epoch(self, pos: Any, record: dict) -> None:
        """After an epoch: record = {"epoch", "train", "valid", "seconds", ...}."""
        if not self.active:
            return
        train, valid = record["train"], record["valid"]
        sps = train.get("n", 0) / max(record["seconds"], 1e-9)
        self._event({"event": "epoch", "step": pos.step, "samples_per_s": sps, **record})
        self._progress(
            {
                "epoch": record["epoch"],
                "epochs": self.cfg.train.epochs,
                "step": pos.step,
                "steps_per_epoch": self.steps_per_epoch,
                "samples_per_s": sps,
                "epoch_done": {"train": train, "valid": valid},
            }
        )
        if self._tb is not None:
            for split, m in (("train", train), ("valid", valid)):
                for k in ("logloss", "auc", "rmse", "mae"):
                    if m.get(k) is not None:
                        self._tb.add_scalar(f"{split}/{k}", m[k], record["epoch"])
            self._tb.add_scalar("train/epoch_samples_per_s", sps, record["epoch"])
            self._tb.flush()
            self._upload_tb()

    def _upload_tb(self) -> None:
        if self.store.local or self._tb_dir is None:
            return
        for name in os.listdir(self._tb_dir):
            src = os.path.join(self._tb_dir, name)
            self.store.write_bytes(f"tensorboard/{name}", open(src, "rb").read())

    def finish(self, summary: dict) -> dict:
        if self.active:
            test = summary.get("test", {})
            extra = {k: summary[k] for k in ("test_low",) if k in summary}
            self._event({"event": "test", "test": test, **extra})
            self.store.write_json("summary.json", summary)
            if self._tb is not None:
                for k, v in test.items():
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"test/{k}", v, 0)
                start = summary.get("started_from")
                if start:
                    self._tb.add_text("run/started_from", str(start), 0)
                self._tb.close()
                self._upload_tb()
        return summary
