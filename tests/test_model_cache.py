"""storage.cache.fetch_prefix against a real S3 server (SeaweedFS)."""
import multiprocessing
import os
import uuid
from pathlib import Path

import pytest

from storage import cache, fs

pytestmark = pytest.mark.timeout(120)

BUCKET = "model-cache-tests"
FAKE_MODEL = {
    "model_index.json": b'{"_class_name": "FakePipeline"}',
    "scheduler/scheduler_config.json": b'{"num_train_timesteps": 1000}',
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": os.urandom(300_000),
    "text_encoder/model.safetensors": os.urandom(9 * 1024 * 1024),  # above boto3's 8 MiB multipart threshold
    "tokenizer/vocab.json": b'{"a": 0}',
}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != cache.MARKER
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def model_uri(s3_server):
    """A fresh copy of the fake model under a unique prefix."""
    uri = fs.join(s3_server.create_bucket(BUCKET), "models", uuid.uuid4().hex)
    for rel, data in FAKE_MODEL.items():
        fs.write_bytes(fs.join(uri, rel), data)
    return uri


def test_fetch_twice_downloads_once(model_uri, tmp_path, monkeypatch):
    first = cache.fetch_prefix(model_uri, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and len(first.name) == 32
    assert _tree(first) == FAKE_MODEL
    assert (first / cache.MARKER).is_file()
    before = _mtimes(first)

    def no_download(*args, **kwargs):
        raise AssertionError("a cached model was downloaded again")

    monkeypatch.setattr(fs.s3_client(), "download_file", no_download)
    assert cache.fetch_prefix(model_uri, tmp_path / "cache") == first
    assert cache.fetch_prefix(model_uri + "/", str(tmp_path / "cache")) == first
    assert _mtimes(first) == before
    assert _tree(first) == FAKE_MODEL
    # Nothing else in the cache root but the model dir and its lock file.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, first.name + ".lock", "fetches.jsonl"])
    assert len((tmp_path / "cache" / "fetches.jsonl").read_text().splitlines()) == 1  # one download logged


def test_changed_object_gives_a_new_dir(model_uri, tmp_path):
    first = cache.fetch_prefix(model_uri, tmp_path)
    fs.write_bytes(fs.join(model_uri, "unet/config.json"), b'{"sample_size": 16}')
    second = cache.fetch_prefix(model_uri, tmp_path)
    assert second != first
    assert _tree(first) == FAKE_MODEL  # the old copy is left alone for whoever still uses it
    assert _tree(second) == {**FAKE_MODEL, "unet/config.json": b'{"sample_size": 16}'}


def test_only_objects_under_the_prefix(model_uri, tmp_path):
    """``models/x`` must not pull in ``models/x-extra/...``."""
    fs.write_bytes(model_uri + "-extra/stray.bin", b"stray")
    assert _tree(cache.fetch_prefix(model_uri, tmp_path)) == FAKE_MODEL


def test_same_content_elsewhere_shares_the_dir(model_uri, tmp_path):
    copy = model_uri + "-copy"
    for rel, data in FAKE_MODEL.items():
        fs.write_bytes(fs.join(copy, rel), data)
    assert cache.fetch_prefix(copy, tmp_path) == cache.fetch_prefix(model_uri, tmp_path)


def _fetch_in_child(uri, cache_root, barrier, results):
    barrier.wait(timeout=60)
    try:
        results.put(("ok", str(cache.fetch_prefix(uri, cache_root))))
    except BaseException as exc:  # report, don't hang the parent
        results.put(("error", repr(exc)))


def test_concurrent_processes_share_one_download(model_uri, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    cache_root = tmp_path / "fresh-cache"
    procs = [ctx.Process(target=_fetch_in_child, args=(model_uri, str(cache_root), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    dirs = {path for _, path in outcomes}
    assert len(dirs) == 1
    target = Path(dirs.pop())
    assert _tree(target) == FAKE_MODEL
    assert sorted(p.name for p in cache_root.iterdir()) == sorted([target.name, target.name + ".lock", "fetches.jsonl"])
    assert len((cache_root / "fetches.jsonl").read_text().splitlines()) == 1  # one download, whoever asked
    assert all(p.exitcode == 0 for p in procs)


def test_missing_prefix(s3_server, tmp_path):
    uri = fs.join(s3_server.create_bucket(BUCKET), "models", "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        cache.fetch_prefix(uri, tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-bucket-for-models"):
        cache.fetch_prefix("s3://no-such-bucket-for-models/m", tmp_path)
    assert not any(tmp_path.iterdir())


def test_keys_that_would_escape_are_refused():
    assert cache._relative_key("models/m/unet/config.json", "models/m/") == "unet/config.json"
    for key in ("models/m/../evil", "models/m//abs", "models/m/a/./b", "models/m/" + cache.MARKER, "models/m/a\\..\\b"):
        with pytest.raises(ValueError, match="refusing"):
            cache._relative_key(key, "models/m/")
