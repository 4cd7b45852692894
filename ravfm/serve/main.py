"""`ravfm serve [start|reload|stop]`: the command's three actions, one line of output each.

`start` deploys the app and, unless --detach, stays in the foreground: it rolls out newer
checkpoints when watching (serve.watch_s), and on Ctrl-C or SIGTERM (`ray job stop` of a
submitted serve job) removes the app from the cluster, or stops the local Ray it started.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from ravfm.errors import UserError
from ravfm.serve.config import ServeConfig

__all__ = ["start", "reload_command", "stop_command"]


def _say(message: str) -> None:
    print(f"ravfm serve: {message}", file=sys.stderr, flush=True)


def start(cfg: ServeConfig, *, address: str | None = None, detach: bool = False) -> int:
    """Deploy cfg's app; with detach return at once, else serve until interrupted."""
    import ray

    from ravfm.serve.deploy import deploy, stop, watch

    local = (address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    if detach and local:
        raise UserError(
            "--detach leaves the app on a running cluster; pass --address (or RAY_ADDRESS), "
            "or drop --detach to serve from this process until Ctrl-C"
        )
    state = deploy(cfg, address)
    spec = state["spec"]
    gcs = ray.get_runtime_context().gcs_address
    _say(
        f"{cfg.name} serves step {state['step']} ({spec.dataset}, spec {spec.fingerprint}) with "
        f"{cfg.replicas} replica(s): POST {state['url']}predict, GET {state['url']}model"
    )
    reload_hint = f"ravfm serve reload --address {gcs} --name {cfg.name} --checkpoint NEWER"
    if detach:
        _say(
            f"detached; roll out with `{reload_hint}`, remove with `ravfm serve stop --address {gcs} --name {cfg.name}`"
        )
        return 0
    watching = f"watching {cfg.checkpoint} every {cfg.watch_s:g} s; " if cfg.watch_s else ""
    _say(f"{watching}roll out with `{reload_hint}`; Ctrl-C stops")
    done = threading.Event()
    # Ctrl-C and SIGTERM (`ray job stop`) both end the wait; SIGINT is handled here too, as a
    # process started in the background by a script inherits it ignored.
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: done.set()) for s in stops}
    try:
        if cfg.watch_s:
            watch(cfg, state["checkpoint"], done)
        else:
            done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _say(f"stopping {cfg.name}")
        if local:  # the whole local Ray goes: no app to remove first
            ray.shutdown()
        else:  # the app goes; its replicas finish the requests they hold
            stop(cfg.name, wait=False)
    return 0


def reload_command(checkpoint: str, *, name: str, address: str | None, timeout_s: float) -> int:
    from ravfm.serve.deploy import reload

    out = reload(checkpoint, name=name, address=address, timeout_s=timeout_s)
    _say(f"{name} now serves step {out['step']} ({out['checkpoint']}) on every replica")
    return 0


def stop_command(*, name: str, address: str | None) -> int:
    from ravfm.serve.deploy import stop

    stop(name, address)
    _say(f"removed {name}")
    return 0
