"""Suite-wide fixtures: one Ray cluster, one tiny-model directory and one S3 server per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

# Before anything imports Ray: loopback only, no auth for the local test cluster, fast stall failures.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RENDERFLEET_HOME"] = tempfile.mkdtemp(prefix="rf-home-")

import pytest  # noqa: E402

from s3server import s3_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> str:
    """The tiny models, built once per session; returns the catalog path."""
    from pipelines.tiny import build_tiny_models

    return str(build_tiny_models(tmp_path_factory.mktemp("tiny-models")))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Runs torch on 1 thread for a module (use it through `pytest.mark.usefixtures`): at tiny-model sizes
    1 thread is faster than 2, and 2 threads stall badly when the other core is busy."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster on loopback; yields its address for subprocess drivers."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        object_store_memory=400 * 1024 * 1024,
        log_to_driver=True,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_http(ray_cluster) -> Iterator[str]:
    """Serve's HTTP proxy on a free 127.0.0.1 port for one test module; yields its base URL.

    Serve shuts down after the module: Ray Data tests that follow need the CPUs back."""
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()

from azurite_server import azurite_server  # noqa: E402,F401
from gcs_server import gcs_server  # noqa: E402,F401
