"""One way to address local paths and ``s3://bucket/key`` URIs.

Everything that reads or writes job inputs, outputs or models goes through these
helpers, so a job runs the same against a local directory or an S3 bucket.
S3 settings come from the usual AWS environment variables (``AWS_ENDPOINT_URL``
for S3-compatible servers such as MinIO or SeaweedFS).

Directory semantics: on S3 a "directory" ``s3://b/runs/x`` means every key under
``runs/x/``, so ``list_files("s3://b/runs/x")`` never picks up ``runs/x2/...``.
"""
from __future__ import annotations

import errno
import functools
import os
import posixpath
import random
import re
import stat
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
MAX_ATTEMPTS = 10  # standard-mode retries with backoff: SlowDown, throttling, 5xx, connection errors
_PAGE_SIZE = 1000  # keys per ListObjectsV2 page (tests lower it to exercise pagination)

# Environment variables that decide which S3 client/filesystem we build.
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def is_remote(uri: str) -> bool:
    """A store URI (``scheme://...``) rather than a local path."""
    return is_s3(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """``"s3://b/k/x"`` -> ``("b", "k/x")``; ``"s3://b"`` -> ``("b", "")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// uri: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket or any(c.isspace() or c in "\\?#" for c in bucket):
        raise ValueError(f"malformed s3 uri {uri!r}: expected s3://<bucket>/<key>")
    return bucket, key


def _segments(part: str) -> list[str]:
    """Splits one join() part into path segments, refusing anything that could climb out."""
    if part.startswith(("/", "\\")):
        raise ValueError(f"path part {part!r} is absolute; refusing to join it")
    segs = [s for s in part.replace("\\", "/").split("/") if s not in ("", ".")]
    if ".." in segs:
        raise ValueError(f"path part {part!r} contains '..'; refusing to join it")
    return segs


def join(base: str, *parts: str) -> str:
    """Joins path parts onto a local dir or s3:// prefix; the result always stays under ``base``."""
    segs = [s for p in parts for s in _segments(p)]
    if is_s3(base):
        bucket, key = split_s3(base)
        return S3_SCHEME + "/".join([bucket] + [s for s in key.split("/") if s] + segs)
    return os.path.join(os.path.abspath(base), *segs)


# ------------------------------------------------------------------- S3 clients


def _env() -> tuple:
    # The pid is part of the key: clients and connection pools must not be shared across fork().
    return (os.getpid(),) + tuple(os.environ.get(k) for k in _ENV_KEYS)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client():
    """A boto3 S3 client configured from the environment, cached per process and env."""
    return _cached_client(_env())


@functools.lru_cache(maxsize=8)
def _cached_client(_key: tuple):
    import boto3
    from botocore.config import Config

    endpoint = _endpoint()
    config = Config(
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        # S3-compatible servers behind an endpoint override rarely do virtual-hosted buckets.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A fresh session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=_region(), config=config)


@functools.lru_cache(maxsize=8)
def _cached_s3fs(_key: tuple) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": _region(),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    endpoint = _endpoint()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        kwargs["session_token"] = os.environ.get("AWS_SESSION_TOKEN")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path within it)`` for a local path or s3:// uri, e.g. for Parquet I/O."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _cached_s3fs(_env()), posixpath.join(bucket, key).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    return (response or {}).get("Error", {}).get("Code")


def _not_found(uri: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "no such file or object", uri)


def _require_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"s3 uri {uri!r} names no object (empty key or trailing '/')")
    return bucket, key


# ---------------------------------------------------------------- file helpers


def _temp_name(name: str) -> str:
    """The hidden temporary a local write_bytes goes through: ``.NAME.<32 hex>.tmp`` (see stray_temp_files)."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Writes a whole file/object; readers never see a partial file."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        extra = {"ContentType": content_type} if content_type else {}
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return
    path = os.path.abspath(uri)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, _temp_name(os.path.basename(path)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_size(uri: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{uri} is {size} bytes, more than the limit of {max_bytes} bytes")


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Reads a whole file/object; FileNotFoundError if missing, ValueError if over ``max_bytes``."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _require_key(uri)
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise _not_found(uri) from exc
            raise
        body = response["Body"]
        try:
            # The size is known from the headers before any of the body is read.
            _check_size(uri, response.get("ContentLength", 0), max_bytes)
            data = body.read() if max_bytes is None else body.read(max_bytes + 1)
        finally:
            body.close()
    else:
        path = os.path.abspath(uri)
        try:
            # Non-blocking open: a FIFO or device must not hang the reader; only regular files are read.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise _not_found(uri) from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ValueError(f"{uri} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            _check_size(uri, info.st_size, max_bytes)
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    _check_size(uri, len(data), max_bytes)  # it may have grown since we looked
    return data


def exists(uri: str) -> bool:
    """True for an existing file or directory (on S3: an object, or any key under ``uri/``)."""
    if not is_s3(uri):
        return os.path.exists(os.path.abspath(uri))
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        if not key:
            client.head_bucket(Bucket=bucket)
            return True
        if not key.endswith("/"):
            client.head_object(Bucket=bucket, Key=key)
            return True
    except ClientError as exc:
        if _error_code(exc) not in _NOT_FOUND_CODES:
            raise
        if not key:
            return False
    try:
        page = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except ClientError as exc:
        if _error_code(exc) in _NOT_FOUND_CODES:
            return False
        raise
    return page.get("KeyCount", 0) > 0


def list_files(prefix_uri: str, suffix: str | None = None) -> list[str]:
    """All files under a directory/prefix, recursively, as sorted full uris; [] if there are none.

    On S3 a missing bucket raises FileNotFoundError (a wrong bucket is a configuration error).
    """
    if is_s3(prefix_uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(prefix_uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        out = []
        try:
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": _PAGE_SIZE})
            for page in pages:
                for obj in page.get("Contents", ()):
                    k = obj["Key"]
                    if not k.endswith("/") and (suffix is None or k.endswith(suffix)):
                        out.append(f"{S3_SCHEME}{bucket}/{k}")
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise FileNotFoundError(errno.ENOENT, "no such bucket", f"{S3_SCHEME}{bucket}") from exc
            raise
        return sorted(out)
    root = os.path.abspath(prefix_uri)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in files if suffix is None or f.endswith(suffix))
    return sorted(out)


def delete(uri: str) -> None:
    """Deletes one file/object; a missing one is not an error."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _require_key(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES:
                raise
        return
    try:
        os.remove(os.path.abspath(uri))
    except FileNotFoundError:
        pass


# ------------------------------------------------------- retries and leftovers


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises on a write (disk, permissions, network, S3 errors): worth retrying.

    Anything else (a bad URI, a bug) is not a store failure and is not retried.
    """
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # local-only installs
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


@dataclass
class Backoff:
    """Exponential backoff with jitter: attempt n waits first_s * 2**n (capped), times a random 0.5..1,
    so writers that failed together do not retry together."""

    first_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.cap_s, self.first_s * 2.0 ** min(attempt, 62)) * self.rng.uniform(0.5, 1.0)


def write_retrying(uri: str, data: bytes, content_type: str | None = None, deadline_s: float = 120.0,
                   backoff: Backoff | None = None) -> None:
    """write_bytes, retried with backoff on store errors for up to ``deadline_s`` (then the last error):
    an output is not lost to an outage shorter than that."""
    backoff = backoff or Backoff()
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return write_bytes(uri, data, content_type=content_type)
        except store_errors():
            wait = backoff.delay(attempt)
            if time.monotonic() - started + wait > deadline_s:
                raise
            time.sleep(wait)
            attempt += 1


def stray_temp_files(directory: str, older_than: float, prefix: str = "") -> list[str]:
    """Temporaries of local write_bytes calls that a killed writer left in ``directory`` (not recursive):
    named ``.PREFIX….<32 hex>.tmp`` and last modified before ``older_than`` (epoch seconds).

    S3 writes are single PUTs and leave nothing, so an s3:// directory has none.
    """
    if is_s3(directory):
        return []
    root = os.path.abspath(directory)
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    stray = []
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or not match.group("name").startswith(prefix):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mtime < older_than:
            stray.append(entry.path)
    return sorted(stray)
