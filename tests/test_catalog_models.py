"""The catalog schema, safetensors-only loading, and s3:// model sources through the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import write_manifest
from jobs.render import RenderJob, run
from pipelines.catalog import Catalog, CatalogError, UnknownModel
from pipelines.loading import ModelLoadError, check_safetensors
from storage.fs import join, write_bytes
from storage.results import read_results

pytestmark = pytest.mark.timeout(300)


def write_catalog(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_unknown_keys_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    cases = [
        ({"models": {"a": {"source": "m"}}, "extra": 1}, "unknown keys extra"),
        ({"models": {"a": {"source": "m", "sorce": "x", "taks": []}}}, "models.a: unknown keys sorce, taks"),
        ({"models": {"a": {"source": "m", "policy": {"offlaod": "model"}}}}, "models.a.policy: unknown keys offlaod"),
        ({"models": {"a": {"source": "m", "serve": {"min_replicas": "two"}}}}, "serve.min_replicas: expected int"),
        ({"models": {"a": {"source": "m", "kind": "widget"}}}, "kind: 'widget' is not supported"),
        ({"models": {"a": {"source": "m", "tasks": ["painting"]}}}, "tasks"),
        ({"models": {"a": {"source": "not a dir or hub id"}}}, "neither an existing local directory nor a Hub repo id"),
        ({"models": {"a": {"source": "m"}}, "default_model": "b"}, "default_model 'b' is not a pipeline in models"),
        ({"models": {"a": {"source": "m", "stages": ["zz"]}}}, "names 'zz', which is not a pipeline entry"),
        ({"models": {"a": {"source": "m", "controlnets": ["a"]}}}, "names 'a', which is not a controlnet entry"),
        ({"models": {"a": {"source": "m"}, "e": {"source": "m", "kind": "embedding"}}}, "embeddings need a token"),
        ({"models": {"a": {"source": "m"}, "l": {"source": "m", "kind": "lora", "tasks": ["image"]}}}, "only pipelines serve tasks"),
    ]
    for data, message in cases:
        with pytest.raises(CatalogError, match=message):
            Catalog.load(write_catalog(tmp_path / "c.yaml", data))


def test_serve_resources_are_custom_ray_resources_with_positive_amounts(tmp_path):
    (tmp_path / "m").mkdir()

    def serve(resources) -> dict:
        return {"models": {"a": {"source": "m", "serve": {"resources": resources}}}}

    cat = Catalog.load(write_catalog(tmp_path / "c.yaml", serve({"accelerator_a100": 1, "slice": 0.5})))
    assert cat.get("a").serve.resources == {"accelerator_a100": 1, "slice": 0.5}
    assert Catalog.load(write_catalog(tmp_path / "c.yaml", {"models": {"a": {"source": "m"}}})).get("a").serve.resources == {}
    cases = [
        (serve(["accelerator_a100"]), r"models\.a\.serve\.resources: expected dict, got \['accelerator_a100'\]"),
        (serve({"accelerator_a100": 0}), r"models\.a\.serve\.resources\.accelerator_a100: expected a positive amount, got 0"),
        (serve({"accelerator_a100": -1}), r"serve\.resources\.accelerator_a100: expected a positive amount, got -1"),
        (serve({"accelerator_a100": "one"}), r"serve\.resources\.accelerator_a100: expected a positive amount, got 'one'"),
        (serve({"accelerator_a100": True}), r"serve\.resources\.accelerator_a100: expected a positive amount, got True"),
        (serve({"accelerator_a100": float("inf")}), r"serve\.resources\.accelerator_a100: expected a positive amount, got inf"),
        (serve({"GPU": 1}), r"serve\.resources\.GPU: expected a custom resource name .*num_cpus and num_gpus size a replica"),
        (serve({7: 1}), r"serve\.resources\.7: expected a custom resource name"),
    ]
    for data, message in cases:
        with pytest.raises(CatalogError, match=message):
            Catalog.load(write_catalog(tmp_path / "c.yaml", data))


def test_sources_resolve(tmp_path):
    (tmp_path / "local").mkdir()
    cat = Catalog.load(write_catalog(tmp_path / "c.yaml", {"models": {
        "l": {"source": "local", "defaults": {"num_inference_steps": 3}},
        "h": {"source": "org/model", "revision": "main", "dtype": "float16", "pipeline_class": "StableDiffusionImg2ImgPipeline"},
        "s": {"source": "s3://bucket/models/x"},
    }}))
    assert cat.default_model == "l"
    assert cat.get(None).source == str(tmp_path / "local")
    assert cat.get("h").source == "org/model" and cat.get("h").revision == "main"
    assert cat.get("s").source == "s3://bucket/models/x"
    with pytest.raises(UnknownModel, match="unknown model 'zzz'; catalog has: h, l, s"):
        cat.get("zzz")


@pytest.fixture(scope="module")
def pickle_only_model(tiny_catalog, tmp_path_factory) -> str:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(os.path.join(os.path.dirname(tiny_catalog), "tiny-sd"))
    target = tmp_path_factory.mktemp("pickle") / "tiny-sd-pickle"
    pipe.save_pretrained(target, safe_serialization=False)
    # transformers 5 writes safetensors regardless: turn what is left into pickle files by hand.
    for st in list(target.rglob("*.safetensors")):
        name = "pytorch_model.bin" if st.name == "model.safetensors" else st.name.replace(".safetensors", ".bin")
        torch.save(load_file(st), st.with_name(name))
        st.unlink()
    assert not list(target.rglob("*.safetensors")) and list(target.rglob("*.bin"))
    return str(target)


def test_pickle_only_model_is_refused(pickle_only_model, tmp_path, tiny_catalog, ray_cluster):
    with pytest.raises(ModelLoadError, match="pickle-only weights .*safetensors only"):
        check_safetensors(pickle_only_model)
    catalog = write_catalog(tmp_path / "c.yaml", {"models": {
        "ok": {"source": os.path.join(os.path.dirname(tiny_catalog), "tiny-sd"), "defaults": {"num_inference_steps": 1}},
        "pickled": {"source": pickle_only_model},
    }})
    manifest = write_manifest(str(tmp_path / "m.parquet"), [
        {"id": "a", "prompt": "p", "model": "pickled"},
        {"id": "b", "prompt": "p", "model": "pickled"},
        {"id": "c", "prompt": "p", "model": "ok"},
    ])
    report = run(RenderJob(manifest, str(tmp_path / "out"), catalog=catalog, workers=1, address=ray_cluster))
    assert report.counts == {"ok": 1, "failed": 2} and report.failures == {"model_load_error": 2}
    errors = {r["id"]: r["error"] for r in read_results(str(tmp_path / "out")).to_pylist()}
    assert "pickle-only" in errors["a"] and errors["c"] is None


def test_s3_model_source_goes_through_the_cache(s3_server, tiny_catalog, tmp_path, ray_cluster):
    bucket = s3_server.create_bucket("models")
    local = Path(os.path.dirname(tiny_catalog)) / "tiny-sd"
    for f in local.rglob("*"):
        if f.is_file():
            write_bytes(join(bucket, "tiny-sd", str(f.relative_to(local))), f.read_bytes())
    catalog = write_catalog(tmp_path / "c.yaml", {"models": {"remote": {
        "source": f"{bucket}/tiny-sd", "defaults": {"num_inference_steps": 1}}}})
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"r{i}", "prompt": "p"} for i in range(4)])
    report = run(RenderJob(manifest, str(tmp_path / "out"), catalog=catalog, workers=2, batch_size=2, address=ray_cluster))
    assert report.counts == {"ok": 4}
    cache = Path(os.environ["RENDERFLEET_HOME"]) / "models"
    cached = [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "model_index.json").exists()
