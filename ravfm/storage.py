"""Where a run's files live: a local directory or any fsspec URL (s3://, gs://, file://, memory://).

A `Store` is a directory addressed by relative names. A string that looks like a URL is never
treated as a local path (pathlib would turn `s3://b/x` into the relative path `s3:/b/x`).
Object stores have no rename, so nothing here relies on one for correctness: a file is
written whole (local files through a temporary name and os.replace, objects by a single put),
and a directory of files (a checkpoint, a scored output) is published by a manifest written
last, listing every file with its size and SHA-256; readers trust only what it lists and
verifies (`verify_files`).

JSON written here is strict: NaN and infinities become null (`strict_json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ravfm.errors import UserError

__all__ = [
    "Store",
    "is_url",
    "strict_json",
    "dumps",
    "file_digest",
    "open_url",
    "verify_files",
    "CHUNK",
]

CHUNK = 8 << 20  # bytes per read when hashing


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` strings (file:// included); such a string is never a local path."""
    return "://" in str(path)


def strict_json(v: Any) -> Any:
    """A copy of `v` with every non-finite float as None and numpy scalars as Python numbers."""
    if isinstance(v, dict):
        return {str(k): strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()  # numpy / torch scalars
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def dumps(payload: Any, indent: int | None = 1) -> str:
    """Strict JSON text (no NaN) of `payload`."""
    return json.dumps(strict_json(payload), indent=indent, allow_nan=False)


def open_url(path: str | os.PathLike, mode: str = "rb") -> IO:
    """Open one file given as a local path or an fsspec URL."""
    text = str(path)
    if not is_url(text) or text.startswith("file://"):
        return open(text[len("file://") :] if text.startswith("file://") else text, mode)
    import fsspec

    fs, p = fsspec.core.url_to_fs(text)
    return fs.open(p, mode)


def file_digest(f: IO[bytes]) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of a binary stream read to its end."""
    h, n = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


class Store:
    """A directory at `url` (a local path or an fsspec URL); names inside are '/'-separated."""

    def __init__(self, url: str | os.PathLike) -> None:
        text = str(url)
        self.local = not is_url(text) or text.startswith("file://")
        if self.local:
            text = text[len("file://") :] if text.startswith("file://") else text
            self.url = str(Path(text).resolve())
            self.fs, self.root = None, self.url
        else:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError) as e:
                raise UserError(
                    f"{text}: cannot open this storage URL ({e}); install the fsspec "
                    "backend for it (e.g. pip install 'ravfm[s3]') or use a local path"
                ) from None
            self.url = text.rstrip("/")
            self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def child(self, name: str) -> Store:
        return Store(self.url_of(name))

    def path(self, name: str = "") -> str:
        """The path of `name` within this store's filesystem."""
        if not name:
            return self.root
        return os.path.join(self.root, name) if self.local else posixpath.join(self.root, name)

    def url_of(self, name: str = "") -> str:
        """What to show a user (and pass to another process) for `name`."""
        if not name:
            return self.url
        return self.path(name) if self.local else self.url + "/" + name

    # ---- queries ---------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        return os.path.exists(self.path(name)) if self.local else self.fs.exists(self.path(name))

    def isdir(self, name: str = "") -> bool:
        return os.path.isdir(self.path(name)) if self.local else self.fs.isdir(self.path(name))

    def size(self, name: str) -> int:
        return (
            os.path.getsize(self.path(name)) if self.local else int(self.fs.size(self.path(name)))
        )

    def list(self, name: str = "") -> list[str]:
        """Names of the entries directly under `name` (sorted); [] when it does not exist."""
        p = self.path(name)
        if self.local:
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        try:
            entries = self.fs.ls(p, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != p)

    # ---- reading ---------------------------------------------------------------------------
    def open(self, name: str, mode: str = "rb") -> IO:
        if self.local:
            return open(self.path(name), mode)
        return self.fs.open(self.path(name), mode)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name, "rb") as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def digest(self, name: str) -> tuple[int, str]:
        with self.open(name, "rb") as f:
            return file_digest(f)

    # ---- writing ---------------------------------------------------------------------------
    def makedirs(self, name: str = "") -> None:
        if self.local:
            os.makedirs(self.path(name), exist_ok=True)
        else:
            self.fs.makedirs(self.path(name), exist_ok=True)

    def write_bytes(self, name: str, data: bytes) -> tuple[int, str]:
        """Write `name` whole (a reader never sees it half-written); returns (size, sha256)."""
        if self.local:
            dst = self.path(name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
        else:
            self.fs.pipe_file(self.path(name), data)
        return len(data), hashlib.sha256(data).hexdigest()

    def write_json(self, name: str, payload: Any, indent: int | None = 1) -> tuple[int, str]:
        return self.write_bytes(name, (dumps(payload, indent) + "\n").encode())

    def put_file(self, local_path: str | os.PathLike, name: str) -> tuple[int, str]:
        """Copy a local file to `name` (moved when this store is local); returns (size, sha256)."""
        with open(local_path, "rb") as f:
            size, sha = file_digest(f)
        if self.local:
            dst = self.path(name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(local_path, dst)
        else:
            self.fs.put_file(str(local_path), self.path(name))
        return size, sha

    def get_file(self, name: str, local_path: str | os.PathLike) -> None:
        if self.local:
            import shutil

            shutil.copyfile(self.path(name), local_path)
        else:
            self.fs.get_file(self.path(name), str(local_path))

    def remove(self, name: str = "") -> None:
        """Delete `name` (a file or a whole directory); a missing one is fine."""
        p = self.path(name)
        if self.local:
            import shutil

            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
        elif self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def walk_files(self, name: str = "") -> Iterator[str]:
        """Every file under `name`, as names relative to it ('/'-separated), sorted."""
        base = self.path(name)
        if self.local:
            out = []
            for d, _, files in os.walk(base):
                rel = os.path.relpath(d, base)
                out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
            yield from sorted(out)
        else:
            for p in sorted(self.fs.find(base)):
                yield p[len(base) :].lstrip("/")


def verify_files(store: Store, files: dict[str, dict], what: str) -> None:
    """Check every listed file's size and SHA-256; raise one UserError naming the first that
    is missing, of another size, or whose bytes changed. files: {name: {"bytes", "sha256"}}."""
    for name, want in sorted(files.items()):
        if not store.exists(name):
            raise UserError(f"{what}: {store.url_of(name)} is missing")
        size = store.size(name)
        if size != want["bytes"]:
            raise UserError(
                f"{what}: {store.url_of(name)} has {size:,} bytes, the manifest says "
                f"{want['bytes']:,} (truncated or replaced)"
            )
        if store.digest(name)[1] != want["sha256"]:
            raise UserError(f"{what}: {store.url_of(name)} is damaged (checksum mismatch)")
