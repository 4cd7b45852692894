"""Criteo conversion throughput and peak memory: `python -m bench.convert_throughput [--big]`.

Generates Criteo-shaped raw files with `ravfm synth` (cached in $RAVFM_BENCH_DIR, default
/tmp/ravfm-bench), converts each with `ravfm.data.convert` in a fresh child process (so peak
RSS is that conversion's own), and reports rows/s, CPU seconds per million rows (less
sensitive than wall time to other work on the machine) and peak RSS. The throughput case is
an uncompressed local 2M-row file; the memory cases are 1M and 2M rows, plus 10M with --big:
peak RSS must not grow with the input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import table, write_result

__all__ = ["main"]

_CHILD = """
import json, resource, sys, time
from ravfm.data.convert import convert
t = time.perf_counter()
s = convert("criteo", sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rows": s["rows"], "seconds": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mib": ru.ru_maxrss / 1024}))
"""


def _bench_dir() -> Path:
    d = Path(os.environ.get("RAVFM_BENCH_DIR", Path(tempfile.gettempdir()) / "ravfm-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _source(rows: int) -> tuple[Path, float | None]:
    """A cached synthetic Criteo file of ROWS rows; also the seconds synth took (None if cached)."""
    from ravfm.data.synth import oracle_path, synth

    path = _bench_dir() / f"criteo-{rows}-seed0.txt"
    done = path.with_suffix(".done")  # written last: an interrupted synth is redone
    if path.exists() and oracle_path(path).exists() and done.exists():
        return path, None
    t = time.perf_counter()
    synth("criteo", rows, path, seed=0)
    done.touch()
    return path, time.perf_counter() - t


def _convert(src: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="shards-", dir=_bench_dir())) / "out"
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, str(src), str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["rm", "-rf", str(out.parent)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.convert_throughput", description=__doc__)
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows of the throughput case")
    ap.add_argument("--big", action="store_true", help="also convert 10M rows (2.4 GB raw)")
    args = ap.parse_args(argv)
    cases = sorted({1_000_000, args.rows} | ({10_000_000} if args.big else set()))
    rows, figures = [], {"cases": {}}
    for n in cases:
        src, synth_s = _source(n)
        r = _convert(src)
        r.update(
            rows_per_s=r["rows"] / r["seconds"],
            cpu_s_per_mrow=r["cpu_s"] / r["rows"] * 1e6,
            raw_mib=src.stat().st_size / 2**20,
            synth_s=synth_s,
            load_avg_1m=os.getloadavg()[0],
        )
        figures["cases"][str(n)] = r
        rows.append(
            [
                f"{n:,}",
                round(r["raw_mib"]),
                round(r["seconds"], 2),
                round(r["rows_per_s"]),
                round(r["cpu_s_per_mrow"], 2),
                round(r["peak_rss_mib"]),
                "-" if synth_s is None else round(synth_s, 1),
                round(r["load_avg_1m"], 1),
            ]
        )
    main_case = figures["cases"][str(args.rows)]
    small = figures["cases"]["1000000"]
    largest = figures["cases"][str(cases[-1])]
    figures.update(
        rows_per_s=main_case["rows_per_s"],
        target_rows_per_s=1_000_000,
        cpu_s_per_mrow=main_case["cpu_s_per_mrow"],
        peak_rss_mib_1m=small["peak_rss_mib"],
        peak_rss_mib_largest=largest["peak_rss_mib"],
        largest_rows=cases[-1],
        rss_ratio_largest_vs_1m=largest["peak_rss_mib"] / small["peak_rss_mib"],
        # what the CPU work allows when the machine's cores are not shared with anything else
        rows_per_s_if_cores_free=(os.cpu_count() or 1) * 1e6 / main_case["cpu_s_per_mrow"],
    )
    md = table(
        [
            "rows",
            "raw MiB",
            "convert s",
            "rows/s",
            "CPU s / M rows",
            "peak RSS MiB",
            "synth s",
            "load avg",
        ],
        rows,
    )
    md += (
        f"\n\nthroughput ({args.rows:,} rows, uncompressed local file): "
        f"{figures['rows_per_s']:,.0f} rows/s (target 1,000,000; its CPU work allows "
        f"{figures['rows_per_s_if_cores_free']:,.0f} rows/s on {os.cpu_count()} free cores); peak RSS "
        f"{cases[-1]:,} rows vs 1M: {figures['rss_ratio_largest_vs_1m']:.2f}x"
    )
    print(md)
    write_result("convert_throughput", figures, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
