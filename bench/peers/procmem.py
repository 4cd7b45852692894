"""Peak memory of a whole process tree: the sum of PSS over a command and all its descendants.

`run_measured(cmd)` starts cmd, and every `interval` seconds until it exits sums the `Pss:`
line of /proc/PID/smaps_rollup over the tree rooted at the child (found by walking the ppid
links of /proc/*/stat), grandchildren included: a ravfm driver's Ray GCS, raylet and workers.
PSS splits each shared page between the processes that map it, so the sum does not count
shared libraries or shared memory (Ray's object store) once per process, as an RSS sum would.

Daemons: a process that double-forks (Ray's raylet and GCS do) re-parents when its parent
exits. While measuring, this process is made a child subreaper (prctl PR_SET_CHILD_SUBREAPER),
so such orphans re-parent to it instead of to init and stay in the tree; any process once seen
in the tree also stays counted while it lives (matched by pid and start time).

Limits, honestly: memory is sampled, so a peak shorter than `interval` can be missed, and so
can a process that lives less than one interval; a process that re-parents outside the tree
before it is first seen is missed when the subreaper cannot be set (not Linux, or refused);
orphans of anything else this process starts while measuring are counted too; reading
smaps_rollup of a process owned by another user needs privileges (such a process counts 0).
Sampling stops when the child exits: descendants that outlive it are listed in
"leftover_pids", not killed; an adopted one that exits later stays a zombie of the caller
until the caller exits (nothing reaps it after run_measured returns). Linux only, stdlib only (ravfm's venv and the peers' both use it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
import time

__all__ = ["run_measured", "tree_pss_kb", "pss_kb"]

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def pss_kb(pid: int) -> int:
    """PSS of one process in kB (0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()  # comm may hold spaces and ')'
    except (OSError, IndexError):
        return None
    return int(rest[1]), int(rest[19])  # fields 4 (ppid) and 22 (starttime)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def _tree(roots: set[int], procs: dict[int, tuple[int, int]]) -> set[int]:
    """roots and all their descendants among procs."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def tree_pss_kb(root: int) -> int:
    """Sum of PSS (kB) over root and its descendants, now (one sample)."""
    return sum(pss_kb(p) for p in _tree({root}, _processes()))


def _prctl(option: int, value: int = 0) -> int | None:
    """prctl(option, value); None when unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if option == _PR_GET_CHILD_SUBREAPER:
        out = ctypes.c_int(0)
        ok = libc.prctl(option, ctypes.byref(out), 0, 0, 0) == 0
        return out.value if ok else None
    return 0 if libc.prctl(option, value, 0, 0, 0) == 0 else None


def _reap(pids: set[int]) -> None:
    """Collect adopted orphans that have exited (they are this process's zombies now)."""
    for pid in list(pids):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pids.discard(pid)
        except ChildProcessError:
            pids.discard(pid)


def run_measured(
    cmd: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    interval: float = 0.1,
    timeout: float | None = None,
) -> dict:
    """Run cmd, sampling its process tree's summed PSS every interval seconds until it exits.

    Returns {"returncode", "wall_s", "peak_pss_mb", "stdout", "stderr", "samples",
    "peak_processes", "leftover_pids"}. peak_pss_mb is the largest sampled sum (MiB).
    On timeout (seconds) the child's process group is killed and returncode is negative.
    """
    me = os.getpid()
    before = {p for p, (pp, _) in _processes().items() if pp == me}
    was_reaper = _prctl(_PR_GET_CHILD_SUBREAPER)
    reaper = was_reaper is not None and _prctl(_PR_SET_CHILD_SUBREAPER, 1) is not None
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    peak_kb, peak_n, samples = 0, 0, 0
    known: dict[int, int] = {}  # pid -> start time, every process once seen in the tree
    adopted: set[int] = set()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
    try:
        while True:
            done = child.poll() is not None
            procs = _processes()
            mine = {p for p, (pp, _) in procs.items() if pp == me} - before - {child.pid}
            adopted |= mine
            alive = {p for p, s in known.items() if p in procs and procs[p][1] == s}
            tree = _tree({child.pid} | mine | alive, procs)
            known.update({p: procs[p][1] for p in tree})
            total = sum(pss_kb(p) for p in tree)
            samples += 1
            if total > peak_kb:
                peak_kb, peak_n = total, len(tree)
            _reap(adopted)
            if done:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                os.killpg(child.pid, signal.SIGKILL)
            time.sleep(interval)
        returncode = child.wait()
        wall_s = time.perf_counter() - t0
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        if reaper and not was_reaper:
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)
    procs = _processes()
    leftover = sorted(p for p, s in known.items() if p in procs and procs[p][1] == s)
    _reap(adopted)
    out.seek(0)
    err.seek(0)
    result = {
        "returncode": returncode,
        "wall_s": wall_s,
        "peak_pss_mb": peak_kb / 1024.0,
        "stdout": out.read().decode(errors="replace"),
        "stderr": err.read().decode(errors="replace"),
        "samples": samples,
        "peak_processes": peak_n,
        "leftover_pids": leftover,
        "subreaper": reaper,
    }
    out.close()
    err.close()
    return result
