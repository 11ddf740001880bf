"""storage.fs against a local directory and a real S3 server (SeaweedFS)."""
import os
import uuid

import boto3
import botocore.exceptions
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from storage import fs

pytestmark = pytest.mark.timeout(120)

BUCKET = "fs-tests"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh, empty base location: a local dir, or a unique prefix in a bucket on the server."""
    if request.param == "local":
        return str(tmp_path / "root")
    server = request.getfixturevalue("s3_server")
    return fs.join(server.create_bucket(BUCKET), uuid.uuid4().hex)


def test_round_trip(root):
    a, b, c = fs.join(root, "a.txt"), fs.join(root, "sub", "b.bin"), fs.join(root, "sub/deeper/c.txt")
    assert fs.list_files(root) == []
    assert not fs.exists(a)
    fs.write_bytes(a, b"alpha", content_type="text/plain")
    fs.write_bytes(b, bytes(range(256)))
    fs.write_bytes(c, b"")
    assert fs.exists(a) and fs.exists(b) and fs.exists(c)
    assert fs.exists(fs.join(root, "sub"))  # a directory / common prefix
    assert fs.read_bytes(a) == b"alpha"
    assert fs.read_bytes(b) == bytes(range(256))
    assert fs.read_bytes(c) == b""
    assert fs.list_files(root) == sorted([a, b, c])
    assert fs.list_files(root, suffix=".txt") == sorted([a, c])
    assert fs.list_files(fs.join(root, "sub")) == sorted([b, c])
    assert fs.list_files(root + "/") == sorted([a, b, c])

    fs.write_bytes(a, b"overwritten")
    assert fs.read_bytes(a) == b"overwritten"

    fs.delete(a)
    fs.delete(a)  # missing is fine
    assert not fs.exists(a)
    assert fs.list_files(root) == sorted([b, c])
    assert fs.list_files(fs.join(root, "nothing-here")) == []


def test_prefix_is_a_directory(root):
    """``root/run`` must not list ``root/run2/...``."""
    fs.write_bytes(fs.join(root, "run", "x"), b"1")
    fs.write_bytes(fs.join(root, "run2", "y"), b"2")
    assert fs.list_files(fs.join(root, "run")) == [fs.join(root, "run", "x")]


def test_missing_file_names_the_uri(root):
    uri = fs.join(root, "missing", "file.bin")
    with pytest.raises(FileNotFoundError) as info:
        fs.read_bytes(uri)
    assert uri in str(info.value)


def test_max_bytes(root):
    uri = fs.join(root, "big.bin")
    fs.write_bytes(uri, b"x" * 100)
    assert fs.read_bytes(uri, max_bytes=100) == b"x" * 100
    with pytest.raises(ValueError) as info:
        fs.read_bytes(uri, max_bytes=10)
    assert uri in str(info.value) and "10" in str(info.value)


def test_parquet_through_pyarrow_filesystem(root):
    uri = fs.join(root, "tables", "t.parquet")
    filesystem, path = fs.filesystem(uri)
    table = pa.table({"id": ["a", "b", "c"], "seed": [1, 2, 3]})
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=filesystem)
    assert pq.read_table(path, filesystem=filesystem).equals(table)
    assert fs.list_files(root, suffix=".parquet") == [uri]
    assert fs.read_bytes(uri)[:4] == b"PAR1"


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs.write_bytes("rel/dir/x.bin", b"data")
    assert (tmp_path / "rel/dir/x.bin").read_bytes() == b"data"
    assert fs.list_files("rel") == [str(tmp_path / "rel/dir/x.bin")]
    assert fs.join("rel", "a") == str(tmp_path / "rel" / "a")
    local, path = fs.filesystem("rel/dir/x.bin")
    assert isinstance(local, pafs.LocalFileSystem) and path == str(tmp_path / "rel/dir/x.bin")


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "x.bin"
    for i in range(3):
        fs.write_bytes(str(target), bytes([i]) * 1000)
    assert os.listdir(target.parent) == ["x.bin"]
    assert target.read_bytes() == bytes([2]) * 1000


def test_join():
    assert fs.join("s3://b", "x", "y.png") == "s3://b/x/y.png"
    assert fs.join("s3://b/", "x/", "/".join(["y", "z"])) == "s3://b/x/y/z"
    assert fs.join("s3://b/run//", "a//b") == "s3://b/run/a/b"
    assert fs.join("/data/out", "a", "b.png") == "/data/out/a/b.png"
    for base in ("s3://b/run", "/data/out"):
        for bad in ("..", "../x", "a/../../x", "a/..", "/etc/passwd", "\\x", "a\\..\\..\\x"):
            with pytest.raises(ValueError):
                fs.join(base, bad)
        with pytest.raises(ValueError):
            fs.join(base, "ok", "..")


def test_split_s3():
    assert fs.split_s3("s3://b/k/x") == ("b", "k/x")
    assert fs.split_s3("s3://bucket") == ("bucket", "")
    assert fs.split_s3("s3://bucket/") == ("bucket", "")
    assert fs.is_s3("s3://b/k") and not fs.is_s3("/tmp/x") and not fs.is_s3("S3:/b")
    for bad in ("s3://", "s3:///key", "/local/path", "http://b/k", "s3://bad bucket/k"):
        with pytest.raises(ValueError, match="s3"):
            fs.split_s3(bad)


def test_s3_content_type_and_uri_without_key(s3_server):
    base = fs.join(s3_server.create_bucket(BUCKET), uuid.uuid4().hex)
    uri = fs.join(base, "img.png")
    fs.write_bytes(uri, b"\x89PNG", content_type="image/png")
    bucket, key = fs.split_s3(uri)
    assert fs.s3_client().head_object(Bucket=bucket, Key=key)["ContentType"] == "image/png"
    with pytest.raises(ValueError):
        fs.write_bytes(f"s3://{BUCKET}", b"x")
    with pytest.raises(ValueError):
        fs.read_bytes(base + "/")
    assert fs.exists(f"s3://{BUCKET}")
    assert not fs.exists("s3://no-such-bucket-here")
    assert not fs.exists("s3://no-such-bucket-here/x")
    fs.delete("s3://no-such-bucket-here/x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        fs.read_bytes("s3://no-such-bucket-here/x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        fs.list_files("s3://no-such-bucket-here/x")


def test_s3_listing_paginates(s3_server, monkeypatch):
    base = fs.join(s3_server.create_bucket(BUCKET), uuid.uuid4().hex)
    uris = [fs.join(base, f"part-{i:02d}.json") for i in range(7)]
    for uri in uris:
        fs.write_bytes(uri, b"{}")
    monkeypatch.setattr(fs, "_PAGE_SIZE", 2)
    assert fs.list_files(base) == uris
    assert fs.list_files(base, suffix="-06.json") == uris[-1:]


def test_wrong_credentials_are_rejected(s3_server):
    s3_server.create_bucket(BUCKET)
    bad = s3_server.client(secret_key="not-the-secret", retries=1)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        bad.list_objects_v2(Bucket=BUCKET)
    assert info.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}

    bad_fs = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
        access_key=s3_server.access_key, secret_key="not-the-secret",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    with pytest.raises(OSError):
        bad_fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))


def test_clients_are_configured_from_env_and_retry(s3_server, monkeypatch):
    client = fs.s3_client()
    assert client is fs.s3_client()  # cached per process
    assert client.meta.endpoint_url == s3_server.endpoint
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.retries["mode"] == "standard"
    # botocore stores retries={"max_attempts": 10} (retries after the first try) as 11 attempts in all.
    assert client.meta.config.retries["total_max_attempts"] == fs.MAX_ATTEMPTS + 1 == 11

    filesystem, path = fs.filesystem(f"s3://{BUCKET}/a/b.parquet")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == f"{BUCKET}/a/b.parquet"
    assert filesystem.region == "us-east-1"
    assert fs.filesystem(f"s3://{BUCKET}")[1] == BUCKET

    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    other = fs.s3_client()
    assert other is not client and other.meta.region_name == "eu-west-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert fs.s3_client().meta.region_name == "us-east-1"


def test_boto3_sees_what_fs_writes(s3_server):
    """Objects written through fs are plain S3 objects to any other client."""
    base = fs.join(s3_server.create_bucket(BUCKET), uuid.uuid4().hex)
    fs.write_bytes(fs.join(base, "k.txt"), b"hi")
    bucket, key = fs.split_s3(fs.join(base, "k.txt"))
    plain = boto3.session.Session().client(
        "s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
        aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key,
    )
    assert plain.get_object(Bucket=bucket, Key=key)["Body"].read() == b"hi"


def test_only_regular_local_files_are_read(tmp_path):
    """A FIFO (which would block forever) and a directory fail at once with a clear error."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        fs.read_bytes(str(fifo))
    with pytest.raises(ValueError, match="not a regular file"):
        fs.read_bytes(str(tmp_path))


def test_write_retrying_outlasts_a_short_outage(tmp_path):
    """A folder replaced by a file blocks writes even as root; restored 1 s later, the write goes through."""
    import shutil
    import threading

    folder = tmp_path / "out"
    folder.write_bytes(b"in the way")
    restore = threading.Timer(1.0, lambda: (folder.unlink(), folder.mkdir()))
    restore.start()
    try:
        fs.write_retrying(str(folder / "x.bin"), b"data", deadline_s=30, backoff=fs.Backoff(first_s=0.2, cap_s=0.5))
    finally:
        restore.join()
    assert (folder / "x.bin").read_bytes() == b"data"
    shutil.rmtree(folder)
    folder.write_bytes(b"in the way")
    with pytest.raises(OSError):
        fs.write_retrying(str(folder / "x.bin"), b"data", deadline_s=0.5, backoff=fs.Backoff(first_s=0.2, cap_s=0.2))
