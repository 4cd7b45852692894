"""`make bench`: run every benchmark, then rewrite BENCHMARKS.md from bench/results/*.json."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from bench._common import RESULTS, machine

BENCHES = [
    "convert_throughput",
    "hash_throughput",
    "train_throughput",
    "train_pipeline",
    "score_throughput",
    "serve_latency",
]
ROOT = Path(__file__).resolve().parent.parent


def write_benchmarks_md() -> Path:
    """BENCHMARKS.md: the latest table of each result file and the machine it ran on."""
    parts = [
        "# Benchmarks",
        "",
        "Latest results of `make bench` (and `make bench-accuracy`), "
        "regenerated from `bench/results/*.json`. Ratios are against a baseline measured in "
        "the same run.",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        m = data.get("machine", {})
        parts += [
            f"## {data.get('name', path.stem)}",
            "",
            f"{data.get('when', '?')} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('memory_gib', '?')} GiB"
            + (f", GPU {m['gpu']}" if m.get("gpu") else "")
            + f"; versions {data.get('versions', {})}",
            "",
        ]
        parts += [data.get("table", "(no table)"), ""]
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or BENCHES
    print(f"machine: {machine()}")
    failed = []
    for name in names:
        print(f"\n## {name}\n", flush=True)
        try:
            importlib.import_module(f"bench.{name}").main([])
        except Exception as e:  # noqa: BLE001 - report and go on to the next benchmark
            print(f"{name} failed: {type(e).__name__}: {e}")
            failed.append(name)
    print(f"\nwrote {write_benchmarks_md()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
