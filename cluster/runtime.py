"""Connecting to Ray: an existing cluster when given an address, else a local one on loopback."""

from __future__ import annotations

import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts or joins Ray once per process; a local cluster stays on 127.0.0.1 without a dashboard."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Keeps every connection of a local cluster on loopback (see shared/TESTING.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
