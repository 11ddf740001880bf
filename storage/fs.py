"""One way to address local paths and store URIs (``s3://``, ``gs://``, ``az://``/``abfs://``, ``hf://``).

Everything that reads or writes job inputs, outputs or models goes through these
helpers, so a job runs the same against a local directory or any store. S3 goes
through boto3 (storage.s3), the others through pyarrow's filesystems (storage.stores);
settings come from each store's usual environment variables (``AWS_ENDPOINT_URL``,
``STORAGE_EMULATOR_HOST``, ``AZURE_STORAGE_*``...).

Directory semantics: in a store a "directory" ``s3://b/runs/x`` means every key under
``runs/x/``, so ``list_files("s3://b/runs/x")`` never picks up ``runs/x2/...``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import random
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from storage import stores
from storage.s3 import MAX_ATTEMPTS, s3_client, s3_filesystem  # noqa: F401 - re-exported

S3_SCHEME = "s3://"
_PAGE_SIZE = 1000  # keys per ListObjectsV2 page (tests lower it to exercise pagination)

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def is_remote(uri: str) -> bool:
    """A store URI (``scheme://...``) rather than a local path; an unsupported scheme counts too, so that it
    fails as a store (ValueError naming the supported ones) instead of becoming a local folder."""
    return stores.scheme(uri) is not None


def check_uri(uri: str, what: str, write: bool = False) -> None:
    """ValueError unless ``uri`` is a local path or a supported store URI (writable, for ``write``)."""
    if is_s3(uri):
        split_s3(uri)
        return
    stores.check_uri(uri, what, write)


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
    if is_remote(base):
        loc = stores.locate(base)
        return loc.uri("/".join([s for s in loc.key.split("/") if s] + segs))
    return os.path.join(os.path.abspath(base), *segs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path within it)`` for a local path or store URI, e.g. for Parquet I/O."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), posixpath.join(bucket, key).rstrip("/")
    if is_remote(uri):
        stores.check_uri(uri, "path")
        return stores.filesystem(uri)
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
    if is_remote(uri):
        return stores.write(uri, data, content_type)
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
    elif is_remote(uri):
        stores.check_uri(uri, "input")
        size, data = stores.read(uri, max_bytes)
        _check_size(uri, size, max_bytes)
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
    if not is_remote(uri):
        return os.path.exists(os.path.abspath(uri))
    if not is_s3(uri):
        stores.check_uri(uri, "path")
        return stores.exists(uri)
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
    if is_remote(prefix_uri):
        stores.check_uri(prefix_uri, "path")
        return stores.list_files(prefix_uri, suffix)
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
    if is_remote(uri):
        return stores.delete(uri)
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

    Store writes are single uploads and leave nothing, so a store directory has none.
    """
    if is_remote(directory):
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


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[Any]:
    """A stream for one large file that readers see whole or not at all: written under a hidden temporary
    name beside it, then renamed (locally) or copied in one request (in a store) into place."""
    name = os.path.basename(uri.rstrip("/"))
    tmp = uri[: len(uri.rstrip("/")) - len(name)] + _temp_name(name)
    fs, tmp_path = filesystem(tmp)
    _, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open_output_stream(tmp_path) as stream:
            yield stream
        if is_remote(uri):
            fs.copy_file(tmp_path, path)  # one server-side copy: the object appears whole
            fs.delete_file(tmp_path)
        else:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp_path)
        raise
