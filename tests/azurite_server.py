"""A real Azure Blob server for tests: Azurite (npm) on 127.0.0.1, with an account of its own and a random key,
telemetry off, in its own process group. `make test-deps` installs it under .ci/azurite."""
from __future__ import annotations

import base64
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

READY_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "rftestaccount"


def azurite_binary() -> str:
    """azurite-blob from the project-local install (.ci/azurite), else one on PATH."""
    local = ROOT / ".ci" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("azurite-blob")
    if not found:
        raise RuntimeError("azurite-blob was not found: run `make test-deps` (npm install --prefix .ci/azurite azurite)")
    return found


@dataclass
class AzuriteServer:
    endpoint: str  # http://127.0.0.1:PORT/ACCOUNT
    account: str
    key: str
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _data_dir: Path | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_ACCOUNT_NAME": self.account, "AZURE_STORAGE_ACCOUNT_KEY": self.key,
                "AZURE_STORAGE_BLOB_ENDPOINT": self.endpoint}

    def create_container(self, name: str) -> str:
        """Creates the container (an existing one is fine); returns ``az://name``."""
        import pyarrow.fs as pafs

        netloc = self.endpoint.split("://", 1)[1].split("/", 1)[0]
        store = pafs.AzureFileSystem(account_name=self.account, account_key=self.key, blob_storage_authority=netloc,
                                     blob_storage_scheme="http", dfs_storage_authority=netloc, dfs_storage_scheme="http")
        if store.get_file_info(name).type == pafs.FileType.NotFound:  # creating an existing one retries for seconds
            store.create_dir(name)
        return f"az://{name}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _end_group(proc)
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)


def start_azurite(workdir: Path) -> AzuriteServer:
    workdir = Path(workdir)
    data_dir = workdir / "azurite-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_ports(1)[0]
    key = base64.b64encode(os.urandom(32)).decode()
    cmd = [azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--disableTelemetry", "--disableProductStyleUrl", "--skipApiVersionCheck",
           "--loose", "--silent"]
    env = {**os.environ, "AZURITE_ACCOUNTS": f"{ACCOUNT}:{key}"}
    log = workdir / "azurite.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=data_dir, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = AzuriteServer(f"http://127.0.0.1:{port}/{ACCOUNT}", ACCOUNT, key, proc, data_dir)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"azurite exited with {proc.returncode}; log tail:\n{_tail(log)}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                return server
            except urllib.error.HTTPError:  # any HTTP answer (400/403 without auth) means it is up
                return server
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"azurite did not answer on port {port}: {e!r}; log:\n{_tail(log)}") from e
                time.sleep(0.2)
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory) -> Iterator[AzuriteServer]:
    """One Azurite per test session, its account, key and endpoint in os.environ."""
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        with environ(server.env()):
            yield server
    finally:
        server.stop()
