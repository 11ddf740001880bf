"""storage.fs against gs:// (fake-gcs-server) and az:// (Azurite): the behaviours test_storage_fs checks on S3,
the scheme check, the model cache, and one render job per store."""
import io
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from storage import cache, fs, stores

pytestmark = pytest.mark.timeout(120)

BUCKET = "store-tests"
STORES = ["gs", "az"]


def _bucket(request, scheme: str, name: str = BUCKET) -> str:
    if scheme == "gs":
        return request.getfixturevalue("gcs_server").create_bucket(name)
    return request.getfixturevalue("azurite_server").create_container(name)


@pytest.fixture(params=STORES)
def root(request) -> str:
    """A fresh, empty prefix in a bucket (gs) or container (az) on a server on 127.0.0.1."""
    return fs.join(_bucket(request, request.param), uuid.uuid4().hex)


def test_round_trip(root):
    a, b, c = fs.join(root, "a.txt"), fs.join(root, "sub", "b.bin"), fs.join(root, "sub/deeper/c.txt")
    assert fs.is_remote(root) and fs.list_files(root) == []
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
    assert fs.list_files(a) == []  # an object is not a directory

    fs.write_bytes(a, b"overwritten")
    assert fs.read_bytes(a) == b"overwritten"

    fs.delete(a)
    fs.delete(a)  # missing is fine
    assert not fs.exists(a)
    assert fs.list_files(root) == sorted([b, c])
    assert fs.list_files(fs.join(root, "nothing-here")) == []
    assert fs.stray_temp_files(root, older_than=1e12) == []  # uploads leave no temporaries


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
    assert isinstance(filesystem, (pafs.GcsFileSystem, pafs.AzureFileSystem))
    table = pa.table({"id": ["a", "b", "c"], "seed": [1, 2, 3]})
    pq.write_table(table, path, filesystem=filesystem)
    assert pq.read_table(path, filesystem=filesystem).equals(table)
    assert fs.list_files(root, suffix=".parquet") == [uri]
    assert fs.read_bytes(uri)[:4] == b"PAR1"


@pytest.mark.parametrize("scheme", ["az"])  # fake-gcs-server drops the type pyarrow sends with a GCS upload
def test_content_type_is_stored(request, scheme):
    uri = fs.join(_bucket(request, scheme), uuid.uuid4().hex, "img.png")
    fs.write_bytes(uri, b"\x89PNG", content_type="image/png")
    filesystem, path = fs.filesystem(uri)
    with filesystem.open_input_stream(path) as f:
        metadata = {(k.decode() if isinstance(k, bytes) else k).lower(): v for k, v in f.metadata().items()}
    assert metadata.get("content-type") == b"image/png"


@pytest.fixture(params=STORES)
def bucket(request) -> str:
    return _bucket(request, request.param)


def test_uri_without_key_and_missing_bucket(bucket):
    scheme = bucket.split("://")[0]
    with pytest.raises(ValueError):
        fs.write_bytes(bucket, b"x")
    with pytest.raises(ValueError):
        fs.read_bytes(fs.join(bucket, "k") + "/")
    assert fs.exists(bucket)
    missing = f"{scheme}://no-such-bucket-here"
    assert not fs.exists(missing) and not fs.exists(missing + "/x")
    fs.delete(missing + "/x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        fs.read_bytes(missing + "/x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        fs.list_files(missing + "/x")


def test_listing_spans_pages(gcs_server):
    """More objects than one list page (GCS pages hold 1000; Azure's 5000 would make this slow) come back, once each."""
    base = fs.join(gcs_server.create_bucket(BUCKET), uuid.uuid4().hex)
    uris = [fs.join(base, f"part-{i:04d}.json") for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: fs.write_bytes(u, b"{}"), uris))
    assert fs.list_files(base) == uris
    assert fs.list_files(base, suffix="-1004.json") == uris[-1:]


def test_azure_wrong_key_is_rejected(azurite_server, monkeypatch):
    azurite_server.create_container(BUCKET)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "bm90LXRoZS1rZXk=")
    with pytest.raises(OSError):
        fs.list_files(f"az://{BUCKET}/x")


def test_model_cache_fetches_once_and_sees_changes(root, tmp_path):
    model = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}', "unet/w.safetensors": os.urandom(300_000)}
    uri = fs.join(root, "models", "m")
    for rel, data in model.items():
        fs.write_bytes(fs.join(uri, rel), data)
    fs.write_bytes(uri + "-extra/stray.bin", b"stray")  # a sibling prefix is not part of the model
    first = cache.fetch_prefix(uri, tmp_path)
    got = {p.relative_to(first).as_posix(): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert {k: v for k, v in got.items() if k != cache.MARKER} == model
    assert cache.fetch_prefix(uri + "/", tmp_path) == first
    fs.write_bytes(fs.join(uri, "unet/config.json"), b'{"a": 22}')
    second = cache.fetch_prefix(uri, tmp_path)
    assert second != first and (second / "unet/config.json").read_bytes() == b'{"a": 22}'
    with pytest.raises(FileNotFoundError):
        cache.fetch_prefix(fs.join(root, "no-model"), tmp_path)


# ------------------------------------------------------------------------------ addressing, no server


def test_join_and_filesystem_paths():
    assert fs.join("gs://b", "x", "y.png") == "gs://b/x/y.png"
    assert fs.join("az://c/run//", "a//b") == "az://c/run/a/b"
    assert fs.join("abfs://c@acct.dfs.core.windows.net/run", "x") == "abfs://c@acct.dfs.core.windows.net/run/x"
    for bad in ("..", "a/../../x", "/etc/passwd"):
        with pytest.raises(ValueError):
            fs.join("gs://b/run", bad)
    loc = stores.locate("abfss://c@acct.dfs.core.windows.net/k/x")
    assert (loc.bucket, loc.key, loc.account, loc.path) == ("c", "k/x", "acct", "c/k/x")
    assert stores.locate("hf://datasets/org/name/data.parquet").path == "datasets/org/name/data.parquet"


def test_scheme_check():
    for ok in ("/tmp/x", "rel/x", "s3://b/k", "gs://b/k", "gcs://b", "az://c/k", "abfs://c/k", "hf://org/model"):
        fs.check_uri(ok, "--out" if not ok.startswith("hf") else "MANIFEST")
        assert fs.is_remote(ok) == ("://" in ok)
    with pytest.raises(ValueError, match=r"unsupported scheme 'foo://'.*s3://, gs://.*az://.*hf://"):
        fs.check_uri("foo://x", "--out", write=True)
    with pytest.raises(ValueError, match="read only"):
        fs.check_uri("hf://org/model", "--out", write=True)
    with pytest.raises(ValueError, match="read only"):
        fs.write_bytes("hf://org/model/x.png", b"x")  # refused before any network
    with pytest.raises(ValueError, match="malformed"):
        fs.check_uri("gs:///key", "MANIFEST")
    # An unsupported scheme is a store that fails, never a local folder named "foo:".
    with pytest.raises(ValueError, match="unsupported scheme"):
        fs.write_bytes("foo://x/y", b"x")
    with pytest.raises(ValueError):
        fs.join("foo://x", "y")


def test_actors_get_the_store_settings(monkeypatch):
    from cluster.renderer import storage_env

    for k in ("STORAGE_EMULATOR_HOST", "AZURE_STORAGE_ACCOUNT_KEY", "AWS_REGION", "HF_TOKEN"):
        monkeypatch.setenv(k, "v")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = storage_env()
    assert {"STORAGE_EMULATOR_HOST", "AZURE_STORAGE_ACCOUNT_KEY", "AWS_REGION", "HF_TOKEN"} <= set(env)
    assert "UNRELATED_SECRET" not in env


def test_cli_refuses_an_unsupported_scheme_before_ray(tmp_path):
    """`render m.parquet --out foo://x` exits 2 naming the supported schemes, and creates nothing."""
    root = Path(__file__).resolve().parent.parent
    # Were Ray started, RAY_ADDRESS would make it fail differently.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "render", "m.parquet", "--out", "foo://x"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    assert "error: --out 'foo://x': unsupported scheme 'foo://'; supported: s3://, gs://" in run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []
    from argparse import Namespace

    from jobs.cli import _job
    from jobs.exits import UsageError

    with pytest.raises(UsageError, match="read only"):
        _job(Namespace(), "m.parquet", "hf://org/x")
    with pytest.raises(UsageError, match="MANIFEST 'bar://m.parquet': unsupported scheme"):
        _job(Namespace(), "bar://m.parquet", "out")


# ------------------------------------------------------------------------------ a render job per store


@pytest.mark.timeout(300)
@pytest.mark.parametrize("store", STORES)
def test_render_job_end_to_end(store, request, tiny_catalog, ray_cluster):
    from PIL import Image

    from helpers import write_manifest
    from jobs.render import RenderJob, run
    from storage.results import absolute_uri, read_results

    base = fs.join(_bucket(request, store, "render-e2e"), uuid.uuid4().hex)
    rows = [{"id": f"{store}-{i}", "prompt": f"a small scene {i}", "num_inference_steps": 2} for i in range(4)]
    manifest = write_manifest(fs.join(base, "in", "manifest.parquet"), rows)
    out = fs.join(base, "runs", "one")
    report = run(RenderJob(manifest, out, catalog=tiny_catalog, workers=2, batch_size=2, address=ray_cluster))
    assert report.counts == {"ok": 4}
    results = read_results(out)
    assert sorted(results["id"].to_pylist()) == sorted(r["id"] for r in rows)
    for r in results.to_pylist():
        assert r["status"] == "ok" and r["output_uri"].startswith("image/")
        assert Image.open(io.BytesIO(fs.read_bytes(absolute_uri(out, r["output_uri"])))).size == (64, 64)
    assert not Path(f"{store}:").exists()
