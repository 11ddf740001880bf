"""Stores other than local disk and S3: ``gs://``, ``az://``/``abfs://`` and ``hf://`` (read only).

They go through pyarrow's native GcsFileSystem and AzureFileSystem (each with its endpoint override, for
emulators) and through huggingface_hub's fsspec filesystem, so no store needs a client of our own. Every
setting comes from the store's usual environment variables (see README, "Stores").
"""
from __future__ import annotations

import datetime
import errno
import functools
import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow.fs as pafs

# Scheme -> what it reaches and how it is configured (the order is the order of the error message).
SCHEMES: dict[str, str] = {
    "s3": "S3 and S3-compatible servers (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    "gs": "Google Cloud Storage (GOOGLE_APPLICATION_CREDENTIALS, STORAGE_EMULATOR_HOST)",
    "gcs": "Google Cloud Storage, as gs://",
    "az": "Azure Blob Storage (AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_BLOB_ENDPOINT, "
          "AZURE_STORAGE_CONNECTION_STRING)",
    "abfs": "Azure Blob Storage / Data Lake Gen2, as az:// (abfs://container@account.dfs.core.windows.net/... too)",
    "abfss": "as abfs://",
    "hf": "the Hugging Face Hub, read only (HF_TOKEN, HF_ENDPOINT)",
}
READ_ONLY = {"hf": "the Hugging Face Hub is read only here: models and inputs can come from it, nothing is written to it"}
_FAMILY = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "hf": "hf"}
# What actors must see to reach the same stores as the driver (cluster.renderer.storage_env forwards these).
ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                "HF_TOKEN", "HF_ENDPOINT")
GCS_RETRY_S = 30  # transient GCS errors are retried this long by the client (write_retrying adds its own)
# Azurite's documented development account (UseDevelopmentStorage=true); not a secret.
_AZURITE_ACCOUNT = "devstoreaccount1"
_AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def scheme(uri: str) -> str | None:
    """The scheme of a ``scheme://...`` URI as written, or None for a local path."""
    match = _SCHEME_RE.match(uri) if isinstance(uri, str) else None
    return match.group(1) if match else None


def supported() -> str:
    return ", ".join(f"{s}://" for s in SCHEMES) + " and local paths"


def check_uri(uri: str, what: str, write: bool = False) -> None:
    """ValueError naming ``what`` (e.g. "--out") unless the URI is a local path or a supported store URI
    (and, for ``write``, one we may write to): called before anything runs, so a typo fails at once."""
    s = scheme(uri)
    if s is None:
        return
    if s not in SCHEMES:
        raise ValueError(f"{what} {uri!r}: unsupported scheme '{s}://'; supported: {supported()}")
    if write and s in READ_ONLY:
        raise ValueError(f"{what} {uri!r}: {READ_ONLY[s]}")
    locate(uri)


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Location:
    """A parsed store URI: ``scheme://authority/key``; the authority is a bucket or container (for abfs,
    possibly ``container@account.dfs.core.windows.net``)."""

    scheme: str
    authority: str
    bucket: str
    key: str
    account: str | None = None

    @property
    def path(self) -> str:
        """The path inside the store's pyarrow filesystem: ``bucket/key``."""
        return posixpath.join(self.bucket, self.key).rstrip("/")

    def uri(self, key: str = "") -> str:
        """The URI of another key in the same bucket, spelled like this one."""
        return f"{self.scheme}://{self.authority}" + (f"/{key}" if key else "")


def locate(uri: str) -> Location:
    """Parses a store URI (not s3://, which storage.fs handles itself); ValueError when malformed."""
    s = scheme(uri)
    if s is None or s not in _FAMILY:
        raise ValueError(f"{uri!r} is not a store URI; supported: {supported()}")
    authority, _, key = uri[len(s) + 3:].partition("/")
    bucket, account = authority, None
    if _FAMILY[s] == "azure" and "@" in authority:
        bucket, _, host = authority.partition("@")
        account = host.split(".", 1)[0] or None
    if not bucket or any(c.isspace() or c in "\\?#@" for c in bucket):
        raise ValueError(f"malformed {s} uri {uri!r}: expected {s}://<bucket>/<key>")
    return Location(s, authority, bucket, key, account)


def require_key(uri: str) -> Location:
    """The location of one object; ValueError for a bucket alone or a trailing '/'."""
    loc = locate(uri)
    if not loc.key or loc.key.endswith("/"):
        raise ValueError(f"{loc.scheme} uri {uri!r} names no object (empty key or trailing '/')")
    return loc


# --------------------------------------------------------------------------- filesystems


def _env_key() -> tuple:
    # The pid is part of the key: filesystems and their connection pools must not be shared across fork().
    return (os.getpid(),) + tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path within it)`` for a gs://, az://, abfs:// or hf:// URI."""
    loc = locate(uri)
    return _cached(_FAMILY[loc.scheme], loc.account, _env_key()), loc.path


@functools.lru_cache(maxsize=16)
def _cached(family: str, account: str | None, _key: tuple) -> pafs.FileSystem:
    if family == "gcs":
        return _gcs()
    if family == "azure":
        return _azure(account)
    from huggingface_hub import HfFileSystem  # fsspec; reads HF_TOKEN and HF_ENDPOINT itself

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


def _gcs() -> pafs.GcsFileSystem:
    """Default Google credentials, or an emulator (anonymous) at STORAGE_EMULATOR_HOST."""
    kwargs: dict = {"retry_time_limit": datetime.timedelta(seconds=GCS_RETRY_S)}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parts = urlsplit(emulator if "://" in emulator else "http://" + emulator)
        kwargs.update(anonymous=True, endpoint_override=parts.netloc, scheme=parts.scheme)
    if os.environ.get("GOOGLE_CLOUD_PROJECT"):
        kwargs["project_id"] = os.environ["GOOGLE_CLOUD_PROJECT"]
    return pafs.GcsFileSystem(**kwargs)


def _connection_string() -> dict[str, str]:
    """AZURE_STORAGE_CONNECTION_STRING as a dict (``UseDevelopmentStorage=true`` expands to Azurite's)."""
    raw = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    parts = dict(p.split("=", 1) for p in raw.split(";") if "=" in p)
    if parts.get("UseDevelopmentStorage", "").lower() == "true":
        parts = {"AccountName": _AZURITE_ACCOUNT, "AccountKey": _AZURITE_KEY,
                 "BlobEndpoint": f"http://127.0.0.1:10000/{_AZURITE_ACCOUNT}", **parts}
    return parts


def _azure(account: str | None) -> pafs.AzureFileSystem:
    """An account key or SAS token when given, else Azure's default credential chain (AZURE_CLIENT_ID, ...)."""
    env, conn = os.environ.get, _connection_string()
    account = account or env("AZURE_STORAGE_ACCOUNT_NAME") or env("AZURE_STORAGE_ACCOUNT") or conn.get("AccountName")
    if not account:
        raise ValueError("az:// needs a storage account: set AZURE_STORAGE_ACCOUNT_NAME "
                         "(or AZURE_STORAGE_CONNECTION_STRING), or write abfs://container@ACCOUNT.dfs.core.windows.net/...")
    kwargs: dict = {"account_name": account}
    key = env("AZURE_STORAGE_ACCOUNT_KEY") or env("AZURE_STORAGE_KEY") or conn.get("AccountKey")
    sas = env("AZURE_STORAGE_SAS_TOKEN") or conn.get("SharedAccessSignature")
    if key:
        kwargs["account_key"] = key
    elif sas:
        kwargs["sas_token"] = sas
    endpoint = env("AZURE_STORAGE_BLOB_ENDPOINT") or conn.get("BlobEndpoint")
    if endpoint:  # an emulator or sovereign cloud: the account is then part of the path, not the host
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        dfs = parts.netloc.replace(".blob.", ".dfs.")
        kwargs.update(blob_storage_authority=parts.netloc, blob_storage_scheme=parts.scheme,
                      dfs_storage_authority=dfs, dfs_storage_scheme=parts.scheme)
    return pafs.AzureFileSystem(**kwargs)


# --------------------------------------------------------------------------- file operations


def _not_found(uri: str, what: str = "no such file or object") -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, what, uri)


def read(uri: str, max_bytes: int | None) -> tuple[int, bytes]:
    """``(size the store reports, data)``; reads at most ``max_bytes + 1`` bytes so the caller can refuse more."""
    require_key(uri)
    store, path = filesystem(uri)
    try:
        f = store.open_input_file(path)
    except FileNotFoundError as exc:
        raise _not_found(uri) from exc
    with f:
        size = f.size()
        if max_bytes is not None and size > max_bytes:
            return size, b""
        return size, f.read() if max_bytes is None else f.read(max_bytes + 1)


def write(uri: str, data: bytes, content_type: str | None = None) -> None:
    """One object, whole: GCS and Azure make an upload visible only once it is complete."""
    check_uri(uri, "destination", write=True)
    require_key(uri)
    store, path = filesystem(uri)
    metadata = {"Content-Type": content_type} if content_type else None
    with store.open_output_stream(path, metadata=metadata) as out:
        out.write(data)


def exists(uri: str) -> bool:
    """An object, a bucket, or any key under ``uri/``."""
    store, path = filesystem(uri)
    return store.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Every object under ``uri/`` (sorted URIs); FileNotFoundError when the bucket itself is missing."""
    loc = locate(uri)
    store, path = filesystem(uri)
    try:
        infos = store.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except NotADirectoryError:  # an object, not a prefix
        return []
    if not infos and store.get_file_info(loc.bucket).type == pafs.FileType.NotFound:
        raise _not_found(loc.uri(), "no such bucket")
    prefix = loc.bucket + "/"
    return sorted(loc.uri(i.path[len(prefix):]) for i in infos
                  if i.type == pafs.FileType.File and (suffix is None or i.path.endswith(suffix)))


def delete(uri: str) -> None:
    """Deletes one object; a missing one (or bucket) is not an error."""
    check_uri(uri, "destination", write=True)
    require_key(uri)
    store, path = filesystem(uri)
    if store.get_file_info(path).type == pafs.FileType.NotFound:
        return  # asked first: Azure retries the delete of a missing blob for seconds before it says so
    try:
        store.delete_file(path)
    except FileNotFoundError:
        pass
