"""The online endpoint: real HTTP to a real Serve app on 127.0.0.1, the official openai SDK unmodified."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import trimesh
import yaml
from PIL import Image

from cluster.api import failure_error
from helpers import probe_video
from storage.params import Limits
from storage.reasons import REASONS
from pipelines.media.watermark import WatermarkConfig, bit_accuracy

pytestmark = pytest.mark.timeout(600)

# The secured app serves no model and validates against tighter limits than the defaults.
SECURE_LIMITS = Limits(max_steps=3, max_pixels=128 * 128, max_prompt_chars=50)
SERVED = ["tiny-sd", "tiny-sdxl", "tiny-lcm", "tiny-sd-img2img", "tiny-t2v", "tiny-audioldm", "tiny-shap-e"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_catalog(tiny_catalog: str, folder: Path) -> str:
    """A small catalog: tiny-sd always up; the others scale from zero; tiny-lcm with a tiny queue."""
    base = Path(tiny_catalog).parent
    data = yaml.safe_load(Path(tiny_catalog).read_text())
    models = {}
    for name in SERVED + ["tiny-safety-checker"]:
        entry = dict(data["models"][name], source=str(base / data["models"][name]["source"]))
        if entry["kind"] == "pipeline":
            entry["serve"] = {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 600.0}
        models[name] = entry
    models["tiny-sd"]["serve"] = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.2,
                                  "max_ongoing_requests": 64, "max_queued_requests": 256}
    models["tiny-sdxl"]["serve"] = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1.0,
                                    "max_ongoing_requests": 4, "upscale_delay_s": 0.5, "downscale_delay_s": 3.0,
                                    "max_batch_size": 2}
    models["tiny-lcm"]["serve"] = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 1, "max_ongoing_requests": 1,
                                   "max_queued_requests": 1}
    (folder / "policy.yaml").write_text(yaml.safe_dump({"terms": ["forbidden"]}))
    safety = {**data.get("safety", {}), "prompt_policy": str(folder / "policy.yaml")}
    path = folder / "serve-catalog.yaml"
    path.write_text(yaml.safe_dump({"default_model": "tiny-sd", "safety": safety, "models": models}, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_catalog, ray_cluster):
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app

    folder = tmp_path_factory.mktemp("serve")
    catalog = serve_catalog(tiny_catalog, folder)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=base, max_upload_bytes=200_000)
    secured = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=base + "/secure",
                          api_keys=("sk-test-key",), limits=SECURE_LIMITS)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="rf", route_prefix="/")
        serve.run(build_app(secured, model_names=[]), name="rf-secure", route_prefix="/secure")
        yield base
    finally:
        serve.shutdown()  # Ray Data tests that follow need the CPUs back


def client(base: str, **kw):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def decode_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_sdk_generate_b64_and_url(server):
    c = client(server)
    r = c.images.generate(model="tiny-sd", prompt="a lighthouse", size="256x256", n=2, response_format="b64_json")
    assert len(r.data) == 2 and r.data[0].revised_prompt == "a lighthouse"
    images = [decode_image(d.b64_json) for d in r.data]
    assert all(i.size == (256, 256) for i in images)
    assert all(bit_accuracy(np.asarray(i.convert("RGB")), WatermarkConfig()) >= 0.95 for i in images)
    u = c.images.generate(model="tiny-sd", prompt="a lighthouse", size="64x64", response_format="url", extra_body={"seed": 7})
    got = httpx.get(u.data[0].url, timeout=30)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)
    tampered = u.data[0].url[:-4] + "0000"
    assert httpx.get(tampered, timeout=30).status_code == 403


def test_openai_sdk_edit(server, tmp_path):
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    with open(src, "rb") as f:
        r = client(server).images.edit(model="tiny-sd-img2img", image=f, prompt="make it autumn", response_format="b64_json")
    assert decode_image(r.data[0].b64_json).size == (64, 64)


def test_other_routes_return_standard_files(server):
    v = httpx.post(server + "/v1/videos/generations", json={"model": "tiny-t2v", "prompt": "waves", "num_frames": 6, "fps": 6}, timeout=180)
    assert v.status_code == 200, v.text
    path = Path("/tmp") / f"rf-serve-{time.time_ns()}.mp4"
    path.write_bytes(base64.b64decode(v.json()["data"][0]["b64_json"]))
    info = probe_video(str(path))
    path.unlink()
    assert (info["codec"], info["frames"], info["fps"]) == ("h264", 6, 6.0)
    a = httpx.post(server + "/v1/audio/generations", json={"model": "tiny-audioldm", "prompt": "a chime", "audio_length_in_s": 1.0}, timeout=180)
    assert a.status_code == 200, a.text
    with wave.open(io.BytesIO(base64.b64decode(a.json()["data"][0]["b64_json"]))) as w:
        assert w.getframerate() == 16000 and abs(w.getnframes() / 16000 - 1.0) < 0.01
    m = httpx.post(server + "/v1/meshes/generations", json={"model": "tiny-shap-e", "prompt": "a vase"}, timeout=300)
    assert m.status_code == 200, m.text
    mesh = trimesh.load(io.BytesIO(base64.b64decode(m.json()["data"][0]["b64_json"])), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0


def test_concurrent_requests_are_batched(server):
    def one(i: int) -> int:
        return httpx.post(server + "/v1/images/generations",
                          json={"model": "tiny-sd", "prompt": f"scene {i}", "size": "64x64", "num_inference_steps": 2},
                          timeout=300).status_code

    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64
    metrics = httpx.get(server + "/metrics", timeout=30).text
    batches = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("renderfleet_batch_size_") and 'model="tiny-sd"' in line and ('le="1.0"' in line or "_count" in line)}
    assert batches["renderfleet_batch_size_count"] > batches["renderfleet_batch_size_bucket"], metrics


def test_overload_gets_503_quickly(server):
    def one(_: int) -> tuple[int, str | None, dict]:
        r = httpx.post(server + "/v1/images/generations",
                       json={"model": "tiny-lcm", "prompt": "x", "size": "256x256", "num_inference_steps": 4}, timeout=120)
        return r.status_code, r.headers.get("retry-after"), r.json()

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    rejected = [r for r in results if r[0] == 503]
    assert rejected and all(r[0] in (200, 503) for r in results)
    status, retry_after, body = rejected[0]
    assert retry_after == "1" and body["error"]["code"] == "overloaded" and body["error"]["type"] == "server_error"
    assert time.monotonic() - started < 120


def serve_replicas(name: str) -> int:
    from ray import serve

    status = serve.status().applications["rf"].deployments[f"model-{name}"]
    return sum(status.replica_states.values()) if status.replica_states else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_autoscaling_zero_to_two_and_back(server):
    assert serve_replicas("tiny-sdxl") == 0
    r = httpx.post(server + "/v1/images/generations", json={"model": "tiny-sdxl", "prompt": "x", "size": "64x64"}, timeout=300)
    assert r.status_code == 200, r.text
    assert serve_replicas("tiny-sdxl") >= 1

    def burst(_: int) -> int:
        return httpx.post(server + "/v1/images/generations",
                          json={"model": "tiny-sdxl", "prompt": "y", "size": "128x128", "num_inference_steps": 8},
                          timeout=300).status_code

    with ThreadPoolExecutor(8) as pool:
        deadline = time.monotonic() + 120
        peak = 1
        while time.monotonic() < deadline and peak < 2:
            codes = list(pool.map(burst, range(8)))
            assert set(codes) <= {200, 503}
            peak = max(peak, serve_replicas("tiny-sdxl"))
    assert peak == 2, "never scaled to 2 replicas under load"
    wait_for(lambda: serve_replicas("tiny-sdxl") == 0, 120, "did not scale back to zero when idle")


@pytest.mark.parametrize("payload, status, param, code", [
    ('{"prompt": "x", ', 400, None, "invalid_json"),
    ({"prompt": "x", "n": "many"}, 400, "n", "invalid_value"),
    ({"prompt": "x", "n": 11}, 400, "n", "invalid_value"),
    ({"prompt": "x", "size": "100x100"}, 400, "size", "invalid_size"),
    ({"prompt": "x", "size": "9000x9000"}, 400, "size", "invalid_size"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "invalid_steps"),
    ({"prompt": ""}, 400, "prompt", "invalid_value"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model", "model_not_found"),
    ({"prompt": "x", "model": "tiny-t2v"}, 400, "model", "unsupported_task"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param, code):
    kwargs = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, str) else {"json": payload}
    r = httpx.post(server + "/v1/images/generations", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and (param is None or error["param"] == param) and error["message"]


def test_filtered_prompt_is_a_clear_400(server):
    r = httpx.post(server + "/v1/images/generations", json={"model": "tiny-sd", "prompt": "a ｆｏｒｂｉｄｄｅｎ thing"}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "content_policy_violation" and "prompt_policy: term:forbidden" in error["message"]
    metrics = httpx.get(server + "/metrics", timeout=30).text
    assert 'renderfleet_filtered_total{model="tiny-sd",reason="prompt_policy"} 1.0' in metrics


def test_upload_limits(server):
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big, format="PNG")
    r = httpx.post(server + "/v1/images/edits", files={"image": ("big.png", big.getvalue(), "image/png")},
                   data={"prompt": "x", "model": "tiny-sd-img2img"}, timeout=60)
    assert r.status_code in (400, 413), r.text
    assert "image" in r.json()["error"]["message"] or r.json()["error"]["param"] == "image"
    r = httpx.post(server + "/v1/images/edits", data={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_auth_on_and_off(server):
    assert httpx.get(server + "/v1/models", timeout=30).status_code == 200
    models = {m["id"]: m["tasks"] for m in httpx.get(server + "/v1/models", timeout=30).json()["data"]}
    assert models["tiny-t2v"] == ["video"] and "tiny-sd" in models
    secure = server + "/secure/v1/models"
    assert httpx.get(secure, timeout=30).status_code == 401
    assert httpx.get(secure, headers={"Authorization": "Bearer wrong"}, timeout=30).json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(secure, headers={"Authorization": "Bearer sk-test-key"}, timeout=30).status_code == 200
    assert httpx.get(server + "/healthz", timeout=30).json() == {"status": "ok"}


# One request per client-side reason a render can fail with, each answered by its own status and code.
REASON_REQUESTS = [
    ("images/generations", {"prompt": "x" * 10_001}, "invalid_prompt"),
    ("images/generations", {"prompt": "x", "seed": -1}, "invalid_seed"),
    ("images/generations", {"prompt": "x", "num_inference_steps": 201}, "invalid_steps"),
    ("images/generations", {"prompt": "x", "guidance_scale": 101}, "invalid_guidance"),
    ("images/generations", {"prompt": "x", "size": "64x65"}, "invalid_size"),
    ("images/generations", {"prompt": "x", "output_format": "bmp"}, "invalid_output_format"),
    ("images/generations", {"prompt": "x", "controlnet_conditioning_scale": 11}, "invalid_controlnet_scale"),
    ("videos/generations", {"model": "tiny-t2v", "prompt": "x", "num_frames": 257}, "invalid_frames"),
    ("videos/generations", {"model": "tiny-t2v", "prompt": "x", "fps": 0.01}, "invalid_fps"),
    ("audio/generations", {"model": "tiny-audioldm", "prompt": "x", "audio_length_in_s": 121}, "invalid_audio_length"),
    ("images/generations", {"prompt": "x", "model": "tiny-t2v"}, "unsupported_task"),
    ("images/edits", {"prompt": "x", "model": "tiny-sd-img2img", "strength": "2", "file": "png"}, "invalid_strength"),
    ("images/edits", {"prompt": "x", "model": "tiny-sd-img2img"}, "missing_input"),
    ("images/edits", {"prompt": "x", "model": "tiny-sd-img2img", "file": b"not an image"}, "invalid_input"),
]


@pytest.mark.parametrize("route, payload, code", REASON_REQUESTS, ids=[c for _, _, c in REASON_REQUESTS])
def test_each_reason_has_its_status(server, route, payload, code):
    if route == "images/edits":
        payload = dict(payload)
        upload = payload.pop("file", None)
        if upload == "png":
            upload = io.BytesIO()
            Image.new("RGB", (64, 64), "gray").save(upload, format="PNG")
            upload = upload.getvalue()
        files = {"image": ("in.png", upload, "image/png")} if upload else None
        r = httpx.post(f"{server}/v1/{route}", data=payload, files=files, timeout=120)
    else:
        r = httpx.post(f"{server}/v1/{route}", json=payload, timeout=120)
    assert r.status_code == REASONS[code].http_status == 400, r.text
    assert r.json()["error"]["code"] == code, r.text


def test_every_reason_maps_to_its_status():
    for reason in REASONS.values():
        error = failure_error(f"{reason.code}: something")
        assert error.status == reason.http_status and error.code == reason.code
        assert (error.type == "server_error") == (reason.http_status >= 500)
    assert failure_error("no_such_code: x").status == 500  # unknown codes cannot be raised (RowError refuses them)


def test_online_limits_are_the_deployments(server):
    """The secured app validates against its own (tighter) limits; the open one against the defaults."""
    key = {"Authorization": "Bearer sk-test-key"}
    secure = server + "/secure/v1/images/generations"
    for payload, code in [({"prompt": "x", "num_inference_steps": 4}, "invalid_steps"),
                          ({"prompt": "x", "size": "256x256"}, "invalid_size"),
                          ({"prompt": "x" * 51}, "invalid_prompt")]:
        r = httpx.post(secure, json=payload, headers=key, timeout=60)
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), r.text
    # Within its limits the request passes validation and meets the next check: this app serves no model.
    r = httpx.post(secure, json={"prompt": "x", "num_inference_steps": 3, "size": "64x64"}, headers=key, timeout=60)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found"), r.text
    # The open app takes 4 steps and a prompt at the shared 10,000-character cap.
    r = httpx.post(server + "/v1/images/generations", json={"prompt": "y" * 10_000, "num_inference_steps": 4, "size": "64x64"},
                   timeout=120)
    assert r.status_code == 200, r.text
