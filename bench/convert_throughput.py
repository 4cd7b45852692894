"""Criteo conversion throughput and peak memory: `python -m bench.convert_throughput [--rows N]`.

Generates Criteo-shaped raw files with `ravfm synth` (cached in $RAVFM_BENCH_DIR, default
/tmp/ravfm-bench; 10M rows are 2.3 GiB), converts each with `ravfm.data.convert` in a fresh
child process (so peak RSS is that conversion's own), and reports rows/s, CPU seconds per
million rows (less sensitive than wall time to other work on the machine) and peak RSS. The
throughput case is an uncompressed local file of --rows rows (default 10M: a size where the
conversion's fixed costs, a few hundred ms, do not decide the figure); the memory comparison is
that case against 1M rows: peak RSS must not grow with the input. Wall time is the convert()
call, after the child's imports.
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

# Peak RSS is VmHWM, this process's own high-water mark: ru_maxrss survives exec, so a child
# of a bench process that had synthesised a big file first would report the parent's peak.
_PEAK = """
def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_CHILD = (
    _PEAK
    + """
import json, resource, sys, time
from ravfm.data.convert import convert
t = time.perf_counter()
s = convert("criteo", sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rows": s["rows"], "seconds": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mib": peak_rss_mib()}))
"""
)


# The baseline, run on the same file: Arrow's multithreaded CSV reader streaming the file with
# Criteo's column types (codes as strings) into one zstd Parquet file. No validation, rejects,
# hex decoding or splits: what one would write by hand with pyarrow.
_BASELINE = (
    _PEAK
    + """
import json, resource, sys, time
import pyarrow as pa, pyarrow.csv as csv, pyarrow.parquet as pq
names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
types = {"label": pa.int8(), **{f"I{i}": pa.int64() for i in range(1, 14)},
         **{f"C{i}": pa.string() for i in range(1, 27)}}
t = time.perf_counter()
reader = csv.open_csv(sys.argv[1], read_options=csv.ReadOptions(column_names=names),
                      parse_options=csv.ParseOptions(delimiter="\\t"),
                      convert_options=csv.ConvertOptions(column_types=types))
rows = 0
with pq.ParquetWriter(sys.argv[2] + ".parquet", reader.schema, compression="zstd",
                      compression_level=1) as w:
    for batch in reader:
        w.write_batch(batch)
        rows += batch.num_rows
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rows": rows, "seconds": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mib": peak_rss_mib()}))
"""
)


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


def _convert(src: Path, child: str = _CHILD) -> dict:
    out = Path(tempfile.mkdtemp(prefix="shards-", dir=_bench_dir())) / "out"
    try:
        res = subprocess.run(
            [sys.executable, "-c", child, str(src), str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["rm", "-rf", str(out.parent)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.convert_throughput", description=__doc__)
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the throughput case")
    args = ap.parse_args(argv)
    cases = sorted({1_000_000, args.rows})
    rows, figures = [], {"cases": {}}

    def measure(what: str, src: Path, child: str, synth_s: float | None) -> dict:
        r = _convert(src, child)
        r.update(
            rows_per_s=r["rows"] / r["seconds"],
            cpu_s_per_mrow=r["cpu_s"] / r["rows"] * 1e6,
            raw_mib=src.stat().st_size / 2**20,
            synth_s=synth_s,
            load_avg_1m=os.getloadavg()[0],
        )
        rows.append(
            [
                what,
                f"{r['rows']:,}",
                round(r["raw_mib"]),
                round(r["seconds"], 2),
                round(r["rows_per_s"]),
                round(r["cpu_s_per_mrow"], 2),
                round(r["peak_rss_mib"]),
                "-" if synth_s is None else round(synth_s, 1),
                round(r["load_avg_1m"], 1),
            ]
        )
        return r

    for n in cases:
        src, synth_s = _source(n)
        figures["cases"][str(n)] = measure("ravfm convert", src, _CHILD, synth_s)
    base = measure("baseline: pyarrow CSV -> Parquet", _source(args.rows)[0], _BASELINE, None)
    main_case = figures["cases"][str(args.rows)]
    small = figures["cases"]["1000000"]
    figures.update(
        rows_per_s=main_case["rows_per_s"],
        target_rows_per_s=1_000_000,
        cpu_s_per_mrow=main_case["cpu_s_per_mrow"],
        peak_rss_mib_1m=small["peak_rss_mib"],
        peak_rss_mib_largest=main_case["peak_rss_mib"],
        largest_rows=cases[-1],
        rss_ratio_largest_vs_1m=main_case["peak_rss_mib"] / small["peak_rss_mib"],
        # what the CPU work allows when the machine's cores are not shared with anything else
        rows_per_s_if_cores_free=(os.cpu_count() or 1) * 1e6 / main_case["cpu_s_per_mrow"],
        baseline=base,
        ratio_to_baseline=main_case["rows_per_s"] / base["rows_per_s"],
    )
    md = table(
        [
            "what",
            "rows",
            "raw MiB",
            "seconds",
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
        f"{figures['rows_per_s']:,.0f} rows/s (target 1,000,000), "
        f"{figures['ratio_to_baseline']:.2f}x the baseline on the same file; its CPU work allows "
        f"{figures['rows_per_s_if_cores_free']:,.0f} rows/s on {os.cpu_count()} free cores; peak "
        f"RSS {args.rows:,} rows vs 1M: {figures['rss_ratio_largest_vs_1m']:.2f}x"
    )
    print(md)
    write_result("convert_throughput", figures, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
