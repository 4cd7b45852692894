"""Connecting to a Ray cluster (or starting one in this process), with one-line errors."""

from __future__ import annotations

import os

from ravfm.errors import UserError

__all__ = ["init_ray", "ray_address"]

_AUTH_WORDS = ("token", "unauthenticated", "unauthorized", "authentication", "401", "403")


def ray_address(address: str | None) -> str | None:
    """The cluster to use: --address, else RAY_ADDRESS, else None (a local cluster)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None) -> None:
    """ray.init once: the given cluster, or a local one started in this process."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(address)
    verbose = os.environ.get("RAVFM_VERBOSE", "") not in ("", "0")
    env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    try:
        ray.init(
            address=address,
            include_dashboard=False if address is None else None,
            log_to_driver=verbose,
            logging_level="ERROR",
            runtime_env=env,
        )
    except Exception as e:  # noqa: BLE001 - Ray raises several types for an unreachable cluster
        text = str(e).lower()
        if address is not None and (
            type(e).__name__ == "AuthenticationError" or any(w in text for w in _AUTH_WORDS)
        ):
            from ravfm.submit import auth_error, find_auth_token

            token, source = find_auth_token()
            raise auth_error(address, token, source) from None
        if isinstance(e, (ConnectionError, TimeoutError)) or "connect" in text:
            raise UserError(
                f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}; check "
                "the address (the head's GCS, e.g. HEAD:6379) or drop --address to run locally"
            ) from None
        raise
