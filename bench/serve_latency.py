"""Online serving on loopback: `ravfm serve` latency and throughput, beside `ravfm score`.

Setup (not timed, cached under data/bench/ by bench.score_throughput.prepare): synthetic Criteo
rows converted to shards and an FM checkpoint (k=16, 2**20 hashed rows, random weights). The
request rows are those shard rows written back as the raw file's values (I1..I13 integers,
C1..C26 8-hex-digit codes, empty fields as null). A local Ray cluster runs one Serve app; the
load comes from this process over keep-alive HTTP connections (aiohttp). Every phase sends a
fixed number of requests and stops by itself:

  Serve floor: first, a deployment that answers a constant, through the same proxy (one
      connection, then C): what Ray Serve itself costs per request on this machine;
  1 row at a fixed rate (open loop): request i is due at t0 + i / rate, and its latency counts
      from that due time, so a server that falls behind is charged for the queue it causes;
      at --rate (the target's 100 req/s) and at a lighter --low-rate;
  1 row and 256 rows, closed loop with C connections: as fast as the server answers; 256 rows
      as a list of row objects and as a columnar body (one list per column);
then the app is removed and `ravfm score` scores the same 256-row requests' rows (Parquet in,
Parquet out) on the same cluster. The machine is shared: the 1-minute load average at each
phase's end is recorded with the figures.

Defaults: Serve's HAProxy ingress where installed (--ingress proxy for Serve's Python proxy)
and two replicas, one per core of the 2-core machine the targets are set for.

    python -m bench.serve_latency [--rate 100] [--single 1000] [--batched 200] [--concurrency 8]
                                  [--replicas 2] [--ingress auto|haproxy|proxy]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import table, write_result

__all__ = ["request_rows", "main"]

ROOT = Path(__file__).resolve().parent.parent
P99_TARGET_MS, ROWS_TARGET = 20.0, 50_000


def request_rows(shards: Path, n: int) -> list[dict]:
    """The first n shard rows as request rows (the raw file's values; null = empty field)."""
    import polars as pl

    from ravfm.data.index import split_paths
    from ravfm.data.schemas import CRITEO_CAT, CRITEO_INT

    df = pl.read_parquet(split_paths(shards, "test")[0], n_rows=n)
    hexed = [
        pl.col(c).map_elements(lambda v: f"{v:08x}", return_dtype=pl.String) for c in CRITEO_CAT
    ]
    return df.select(*CRITEO_INT, *hexed).to_dicts()


def _summary(lat_s: list[float], seconds: float, rows_per_request: int) -> dict:
    ms = np.sort(np.asarray(lat_s)) * 1e3
    n = len(ms)
    return {
        "requests": n,
        "rows": n * rows_per_request,
        "seconds": seconds,
        "requests_per_s": n / seconds,
        "rows_per_s": n * rows_per_request / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms[-1]),
        "load_avg_1m": os.getloadavg()[0],
    }


async def _post(session, url: str, body: bytes) -> None:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        payload = await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {payload[:200]!r}")


async def open_loop(url: str, bodies: list[bytes], rate: float) -> dict:
    """Request i due at t0 + i / rate; latency = answer time - due time."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn) as session:
        for body in bodies[:20]:  # warm the connections and the replica
            await _post(session, url, body)
        loop, lat = asyncio.get_running_loop(), []
        t0 = loop.time() + 0.05

        async def one(i: int, body: bytes) -> None:
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            await _post(session, url, body)
            lat.append(loop.time() - due)

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        return _summary(lat, loop.time() - t0, 1)


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, rows: int) -> dict:
    """`concurrency` connections, each sending its next request when the last is answered."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        for body in bodies[:concurrency]:
            await _post(session, url, body)
        loop, lat, queue = asyncio.get_running_loop(), [], list(reversed(bodies))

        async def worker() -> None:
            while queue:
                body = queue.pop()
                start = loop.time()
                await _post(session, url, body)
                lat.append(loop.time() - start)

        t0 = loop.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return _summary(lat, loop.time() - t0, rows)


def _score_rows_per_s(ckpt: Path, shards: Path) -> dict:
    from ravfm.scoring import score

    out = Path(tempfile.mkdtemp(prefix="ravfm-serve-bench-")) / "out"
    try:
        s = score(str(ckpt), str(shards), str(out), keep=[])
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {k: s[k] for k in ("rows", "seconds", "rows_per_s", "scoring_rows_per_s", "actors")}


def _phases(args: argparse.Namespace, url: str, rows: list[dict]) -> dict:
    single = [json.dumps([rows[i % len(rows)]]).encode() for i in range(args.single)]
    groups = [rows[i * 256 : (i + 1) * 256] for i in range(args.batched)]
    as_rows = [json.dumps(g).encode() for g in groups]
    as_cols = [json.dumps({c: [r[c] for r in g] for c in g[0]}).encode() for g in groups]
    c = args.concurrency
    return {
        "single_open_loop": asyncio.run(open_loop(url, single, args.rate)),
        "single_open_loop_low": asyncio.run(
            open_loop(url, single[: args.single // 4], args.low_rate)
        ),
        "single_closed_loop": asyncio.run(closed_loop(url, single, c, 1)),
        "batched_rows": asyncio.run(closed_loop(url, as_rows, c, 256)),
        "batched_columnar": asyncio.run(closed_loop(url, as_cols, c, 256)),
    }


def serve_floor(port: int, n: int, concurrency: int) -> dict:
    """Ray Serve's own cost on this machine: a deployment that answers a constant, through the
    same proxy, one request at a time and with `concurrency` connections."""
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": 1})
    class Echo:  # defined here so it ships by value (bench/ is not on the workers' path)
        async def __call__(self, request):  # noqa: ANN001, ANN202
            await request.body()
            return Response(b'{"prediction": [0.5]}', media_type="application/json")

    logs = {"log_level": "WARNING", "enable_access_log": False}
    serve.run(Echo.options(logging_config=logs).bind(), name="echo", route_prefix="/echo")
    url, body = f"http://127.0.0.1:{port}/echo", [b"[{}]"] * n
    try:
        return {
            "serial": asyncio.run(closed_loop(url, body, 1, 1)),
            "concurrent": asyncio.run(closed_loop(url, body, concurrency, 1)),
        }
    finally:
        serve.delete("echo")


_NAMES = {
    "single_open_loop": "1 row, open loop at {rate:g} req/s",
    "single_open_loop_low": "1 row, open loop at {low_rate:g} req/s",
    "single_closed_loop": "1 row, closed loop, {concurrency} connections",
    "batched_rows": "256 rows (row objects), closed loop, {concurrency} connections",
    "batched_columnar": "256 rows (columnar), closed loop, {concurrency} connections",
}


def _row(what: str, s: dict, rows_per_s: bool = True) -> list:
    per_s = s["rows_per_s"] if rows_per_s else "-"
    return [what, s["requests"], s["requests_per_s"], per_s, s["p50_ms"], s["p99_ms"], s["load_avg_1m"]]  # fmt: skip


def _markdown(f: dict, args: argparse.Namespace) -> str:
    rows = [_row(what.format(**vars(args)), f[key]) for key, what in _NAMES.items()]
    for key, what in (("serial", "1"), ("concurrent", str(args.concurrency))):
        rows.append(_row(f"Serve floor: constant answer, {what} connection(s)", f["serve_floor"][key], False))  # fmt: skip
    sc = f["score"]
    rows.append([f"ravfm score, the same {sc['rows']:,} rows, end to end", "-", "-", sc["rows_per_s"], "-", "-", f["load_avg_1m_after"]])  # fmt: skip
    rows.append(["ravfm score, once running", "-", "-", sc["scoring_rows_per_s"], "-", "-", "-"])
    md = table(["what", "requests", "requests/s", "rows/s", "p50 ms", "p99 ms", "load avg 1m"], rows)  # fmt: skip
    p99 = f["single_open_loop"]["p99_ms"]
    best = max(f["batched_rows"]["rows_per_s"], f["batched_columnar"]["rows_per_s"])
    floor = f["serve_floor"]["concurrent"]["requests_per_s"]
    return md + (
        f"\n\nTargets (2 cores): p99 < {P99_TARGET_MS:g} ms for 1-row requests at 100 req/s: "
        f"{'MET' if p99 < P99_TARGET_MS else 'NOT MET'} ({p99:,.1f} ms); 256-row requests >= "
        f"{ROWS_TARGET:,} rows/s: {'MET' if best >= ROWS_TARGET else 'NOT MET'} "
        f"({best:,.0f}). Ingress: {f['ingress']}; through it, Ray Serve alone (one replica "
        f"answering a constant) tops out at {floor:,.0f} requests/s here. {args.replicas} "
        "replica(s), the ingress and this load generator share the "
        f"cores; latency counts from each request's due time; 1-minute load average before "
        f"{f['load_avg_1m_before']:.2f} (the machine is shared)."
    )


def _measure(args: argparse.Namespace) -> dict:
    """Every phase on a local Ray cluster started here (and stopped at the end)."""
    import ray
    from ray import serve

    from bench.score_throughput import prepare
    from ravfm.serve.config import ServeConfig
    from ravfm.serve.deploy import _client, deploy, ingress_mode, stop

    base = Path(args.data)
    base.mkdir(parents=True, exist_ok=True)
    shards, ckpt = prepare(args.batched * 256, base)
    rows = request_rows(shards, args.batched * 256)
    # Removed replicas behind HAProxy drain 30 s before they exit and free their CPU for the
    # scoring phase; 1 s is plenty on one machine (the local cluster inherits this env).
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    port = _free_port()
    cfg = ServeConfig(checkpoint=str(ckpt), port=port, replicas=args.replicas, batch_wait_ms=args.batch_wait_ms, ingress=args.ingress)  # fmt: skip
    _client(cfg)  # Serve with the ingress asked for; the floor's echo app goes through it too
    try:
        load_before = os.getloadavg()[0]
        floor = serve_floor(port, args.single // 2, args.concurrency)
        t0 = time.perf_counter()
        deploy(cfg)
        startup = time.perf_counter() - t0
        figures = _phases(args, cfg.url() + "predict", rows)
        stop(cfg.name)
        figures["score"] = _score_rows_per_s(ckpt, shards)
    finally:
        serve.shutdown()
        ray.shutdown()
    figures.update(
        serve_floor=floor,
        ingress=ingress_mode(args.ingress),
        load_avg_1m_before=load_before,
        load_avg_1m_after=os.getloadavg()[0],
        deploy_seconds=startup,
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=100.0, help="1-row requests per second")
    ap.add_argument("--low-rate", type=float, default=20.0, help="a second, lighter 1-row rate")
    ap.add_argument("--single", type=int, default=1000, help="1-row requests per phase")
    ap.add_argument("--batched", type=int, default=200, help="256-row requests per phase")
    ap.add_argument("--concurrency", type=int, default=8, help="connections, closed loop")
    ap.add_argument("--replicas", type=int, default=2, help="one per core (2 on the 2-core box)")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--ingress", default="auto", choices=["auto", "haproxy", "proxy"])
    ap.add_argument("--data", default=str(ROOT / "data" / "bench"))
    args = ap.parse_args(argv)
    figures = _measure(args)
    md = _markdown(figures, args)
    print(md)
    figures.update(
        settings={k: v for k, v in vars(args).items() if k != "data"},
        targets={"p99_ms_1row_at_100_rps": P99_TARGET_MS, "rows_per_s_256row": ROWS_TARGET},
        checkpoint="FM k=16, 2**20 hashed rows (bench.score_throughput.prepare)",
    )
    print(f"wrote {write_result('serve_latency', figures, md)}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
