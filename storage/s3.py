"""S3 clients (boto3) and S3 filesystems (pyarrow), configured from the usual AWS environment variables.

Kept apart from storage.fs so that module stays about addressing; storage.fs re-exports what callers use.
"""
from __future__ import annotations

import functools
import os
from urllib.parse import urlsplit

import pyarrow.fs as pafs

MAX_ATTEMPTS = 10  # standard-mode retries with backoff: SlowDown, throttling, 5xx, connection errors

# Environment variables that decide which S3 client/filesystem we build.
ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


def env_key() -> tuple:
    """The cache key of clients: the pid (clients and connection pools must not be shared across fork())
    and every variable that configures them."""
    return (os.getpid(),) + tuple(os.environ.get(k) for k in ENV_KEYS)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client():
    """A boto3 S3 client configured from the environment, cached per process and env."""
    return _cached_client(env_key())


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


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured like s3_client(), cached per process and env."""
    return _cached_s3fs(env_key())


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
