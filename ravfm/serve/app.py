"""The Ray Serve deployment of `ravfm serve`: HTTP routes, dynamic batching, model rollout.

Routes, under the application's route prefix:
  POST predict   JSON rows (see ravfm.serve.rows) -> {"model", "step", "rows", "prediction",
                 and for VFM "prediction_std", "prediction_std_model"}, one value per row in
                 request order
  GET  healthz   {"status": "ok", "step"} once a model is loaded
  GET  model     name, step, spec key, metrics at save time, request columns (ServedModel.info),
                 a reload error if the last rollout failed, and counts of requests, rows, batches
A bad request gets HTTP 400 (413 when the body is over the limit) and {"error": one line}.

Each request is checked and written as raw lines as it arrives; `serve.batch` then groups
the waiting requests, up to max_batch_rows rows, into one parse (the dataset's own parser),
one hashing and one model call, so the fixed cost of each is shared by the batch. The checkpoint comes from the deployment's user_config; a new one is loaded
beside the serving model in `reconfigure` and swapped in by one assignment, so during a
rollout each request is read and scored by the old or the new model, whole, and its answer
carries that model's step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from ravfm.serve.layouts import BadRequest, TooLarge

__all__ = ["Predictor", "build_app", "DEPLOYMENT"]

DEPLOYMENT = "Predictor"
_DRAIN = 4
_log = logging.getLogger("ray.serve")


class _BatchSizeNote(logging.Filter):
    """Drops serve.batch's note that max_batch_size exceeds max_ongoing_requests: batches here
    are sized in rows (batch_size_fn), not requests, so the comparison does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("`max_batch_size`")


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _rows(items: list) -> int:
    """serve.batch size of a batch of (model, Lines) items: its rows."""
    return sum(lines.n for _, lines in items)


async def _body(request: Request, limit: int) -> bytes:
    """The request body; a TooLarge (413) when it passes `limit` bytes. A body up to _DRAIN
    times the limit is read to its end (and dropped) first, so the client, still sending,
    gets to read the answer instead of a reset connection."""
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0
    too_big = (
        f"over the limit of {limit:,} bytes; split the rows over several requests (or raise "
        "serve.max_body_mb)"
    )
    if declared > _DRAIN * limit:
        raise TooLarge(f"the body is {declared:,} bytes, {too_big}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN * limit:
            break
    if size > limit:
        raise TooLarge(f"the body is {max(size, declared):,} bytes or more, {too_big}")
    return b"".join(chunks)


@serve.deployment(name=DEPLOYMENT)
class Predictor:
    """One replica: a ServedModel, swapped whole when user_config names a new checkpoint."""

    def __init__(
        self, max_body_bytes: int, max_batch_rows: int, batch_wait_ms: float, threads: int = 1
    ) -> None:
        import pyarrow as pa
        import torch

        # One core's worth of threads (the env var is also set for the process by the app's
        # runtime_env, before Polars starts its pool): pools sized to the machine oversubscribe
        # the cores that the proxy and other replicas share, and the tail latency suffers.
        os.environ.setdefault("POLARS_MAX_THREADS", str(threads))
        torch.set_num_threads(threads)
        pa.set_cpu_count(threads)
        logging.getLogger("ray.serve").addFilter(_BatchSizeNote())
        self.model: Any = None
        self.error: str | None = None
        self.served = {"requests": 0, "rows": 0, "batches": 0}  # this replica's, for GET model
        self.limit, self.max_batch_rows = max_body_bytes, max_batch_rows
        self.score_batch.set_max_batch_size(max_batch_rows)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

    async def reconfigure(self, config: dict) -> None:
        """Serve the checkpoint config["checkpoint"] (a step-* folder). The first load fails the
        replica's start if it fails; later ones load beside the serving model, which keeps
        answering, and on failure the old model stays (GET model reports the error)."""
        from ravfm.serve.model import ServedModel

        path = str(config["checkpoint"])
        if self.model is not None and self.model.path == path:
            return
        if self.model is None:
            self.model = ServedModel(path)
            return
        try:
            new = await asyncio.to_thread(ServedModel, path)
        except Exception as e:  # noqa: BLE001 - keep serving the old model, say why
            self.error = f"could not load {path}: {type(e).__name__}: {e}"
            _log.error("ravfm serve: %s; still serving step %s", self.error, self.model.step)
            return
        self.model, self.error = new, None  # one assignment: old or new, never a mix

    def info(self) -> dict:
        """This replica's model (for `ravfm serve reload` to confirm a rollout)."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "checkpoint": self.model.path,
            "step": self.model.step,
            "error": self.error,
        }

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        prefix = request.scope.get("root_path", "")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        route = path.strip("/")
        if route == "predict":
            if request.method != "POST":
                return _error(405, "predict takes POST with a JSON body of rows")
            return await self._predict(request)
        if route in ("healthz", "model") and request.method != "GET":
            return _error(405, f"{route} takes GET")
        if route == "healthz":
            return _json({"status": "ok", "step": self.model.step})
        if route == "model":
            return _json({**self.model.info, "reload_error": self.error, "served": self.served})
        return _error(404, f"no route {path!r}; use POST predict, GET healthz or GET model")

    async def _predict(self, request: Request) -> Response:
        model = self.model  # this request is read and scored by one model, whole
        try:
            lines = model.prepare(await _body(request, self.limit))
        except BadRequest as e:
            return _error(e.status, str(e))
        if lines.n >= self.max_batch_rows:
            self.served["batches"] += 1
            (out,) = model.predict_many([lines])
        else:
            out = await self.score_batch((model, lines))
        if isinstance(out, BadRequest):
            return _error(out.status, str(out))
        self.served["requests"] += 1
        self.served["rows"] += lines.n
        answer = {"model": model.name, "step": model.step, "rows": lines.n}
        answer.update((k, v.tolist()) for k, v in out.items())
        return _json(answer)

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.001, batch_size_fn=_rows)
    async def score_batch(self, items: list[tuple[Any, Any]]) -> list:
        """Score the waiting requests together: per model (a batch may straddle a swap) one
        parse, one transform and one model call. items: (model, Lines of B_i rows) -> the
        request's predictions (B_i,), or its BadRequest."""
        self.served["batches"] += 1
        results: list = [None] * len(items)
        for model in {id(m): m for m, _ in items}.values():
            mine = [i for i, (m, _) in enumerate(items) if m is model]
            for i, out in zip(mine, model.predict_many([items[i][1] for i in mine])):
                results[i] = out
        return results


def build_app(args: dict) -> Any:
    """The application Serve builds from the config `ravfm serve` deploys (import path
    ravfm.serve.app:build_app); its user_config names the checkpoint."""
    return Predictor.bind(
        max_body_bytes=int(args["max_body_bytes"]),
        max_batch_rows=int(args["max_batch_rows"]),
        batch_wait_ms=float(args["batch_wait_ms"]),
        threads=int(args.get("threads", 1)),
    )
