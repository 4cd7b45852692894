"""The layering rule of DESIGN.md: walk every module's imports and fail on a forbidden edge."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ravfm"

# module prefix (relative to ravfm) -> third-party or ravfm modules it must not import
FORBIDDEN = {
    "config": {"torch", "polars", "ray", "pyarrow", "numpy"},
    "errors": {"torch", "polars", "ray"},
    "storage": {"torch", "polars", "ray", "pyarrow", "numpy"},
    "data": {"torch", "ray", "ravfm.model", "ravfm.distributed", "ravfm.train"},
    "features": {"torch", "ray", "ravfm.model", "ravfm.distributed", "ravfm.train"},
    "batch": {"polars", "ray", "pyarrow"},
    "model": {"polars", "ray", "pyarrow", "ravfm.data", "ravfm.features", "ravfm.distributed"},
    "metrics": {"polars", "ray", "pyarrow"},
    "distributed": {"ray", "polars", "pyarrow", "ravfm.data", "ravfm.features"},
    "train.loop": {"ray"},
    "train.checkpoint": {"ray"},
    "serve.layouts": {"ray", "torch"},
    "serve.rows": {"ray", "torch"},
    "serve.config": {"ray", "torch", "polars"},
    "serve.model": {"ray"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def test_no_forbidden_import_edges():
    bad = []
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        for prefix, banned in FORBIDDEN.items():
            if mod == prefix or mod.startswith(prefix + "."):
                for name in _imports(path):
                    if any(name == b or name.startswith(b + ".") for b in banned):
                        bad.append(f"ravfm.{mod} imports {name}")
    assert not bad, "forbidden import edges:\n" + "\n".join(sorted(bad))


def test_relative_imports_are_not_used():
    rel = [
        str(p)
        for p in PKG.rglob("*.py")
        if any(
            isinstance(n, ast.ImportFrom) and n.level > 0
            for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert not rel, f"use absolute imports: {rel}"


def test_importing_ravfm_has_no_heavy_side_effects():
    import subprocess
    import sys

    code = "import sys, ravfm, ravfm.config, ravfm.cli; print(','.join(m for m in ('torch','ray','polars') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lint_covers_every_package_file():
    """ruff's default excludes hold names such as `dist` and `build`: a package folder with such
    a name would silently go unchecked by `make lint`."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--show-files", str(PKG)],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = {Path(line.strip()).resolve() for line in out.stdout.splitlines() if line.strip()}
    missing = sorted(str(p) for p in PKG.rglob("*.py") if p.resolve() not in listed)
    assert not missing, f"make lint skips: {missing}"
