"""bench/peers/procmem.py: the summed PSS of a process tree counts grandchildren and daemons."""

from __future__ import annotations

import sys
import textwrap

from bench.peers.procmem import run_measured

# The grandchild touches 200 MiB (bytes * n writes every page) and holds it for a second.
_HOLD = "import time; b = b'x' * (200 << 20); time.sleep(1.0); print(len(b))"


def _child(grandchild: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(grandchild)]


def test_peak_pss_counts_a_grandchild():
    script = f"""
        import subprocess, sys
        out = subprocess.run([sys.executable, "-c", {_HOLD!r}], capture_output=True, text=True)
        print("grandchild said", out.stdout.strip())
    """
    r = run_measured(_child(script), interval=0.05)
    assert r["returncode"] == 0, r["stderr"]
    assert "grandchild said 209715200" in r["stdout"]
    assert r["peak_pss_mb"] > 150
    assert r["peak_processes"] >= 2


def test_peak_pss_counts_a_daemon_that_reparents():
    # the middle process exits at once, so the grandchild is orphaned (a daemon, as Ray's raylet)
    script = f"""
        import os, subprocess, sys, time
        if os.fork() == 0:
            subprocess.Popen([sys.executable, "-c", {_HOLD!r}], stdout=subprocess.DEVNULL)
            os._exit(0)
        os.wait()
        time.sleep(2.0)
    """
    r = run_measured(_child(script), interval=0.05)
    assert r["returncode"] == 0, r["stderr"]
    assert r["peak_pss_mb"] > 150


def test_failure_and_output_come_back():
    r = run_measured([sys.executable, "-c", "import sys; print('out'); sys.exit('boom')"])
    assert r["returncode"] == 1
    assert r["stdout"] == "out\n" and "boom" in r["stderr"]
    assert r["leftover_pids"] == []
