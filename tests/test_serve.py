"""The online endpoint: real HTTP to a real Serve app on 127.0.0.1, the official openai SDK unmodified."""

from __future__ import annotations

import base64
import io
import json
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import trimesh
from PIL import Image

from cluster.api import failure_error
from helpers import probe_video
from serve_helpers import assert_openai_error, percentiles, serve_catalog, settled_outputs, stored_outputs, wait_for
from storage.params import Limits
from storage.reasons import REASONS
from pipelines.media.watermark import WatermarkConfig, bit_accuracy

pytestmark = pytest.mark.timeout(600)

# The secured app serves no model and validates against tighter limits than the defaults.
SECURE_LIMITS = Limits(max_steps=3, max_pixels=128 * 128, max_prompt_chars=50)
SERVED = ["tiny-sd", "tiny-sdxl", "tiny-lcm", "tiny-sd-img2img", "tiny-t2v", "tiny-audioldm", "tiny-shap-e"]


def served_catalog(tiny_catalog: str, folder: Path) -> str:
    """A small catalog: tiny-sd always up; the others scale from zero; tiny-lcm with a tiny queue."""
    serve = {name: {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 600.0} for name in SERVED}
    serve["tiny-sd"] = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.2,
                        "max_ongoing_requests": 64, "max_queued_requests": 256}
    serve["tiny-sdxl"] = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1.0,
                          "max_ongoing_requests": 4, "upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "max_batch_size": 2}
    serve["tiny-lcm"] = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 1, "max_ongoing_requests": 1,
                         "max_queued_requests": 1}
    return serve_catalog(tiny_catalog, folder, serve)


class Server(str):
    """The app's base URL, knowing the local store its outputs and uploads go to."""

    store: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_catalog, serve_http):
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app

    folder = tmp_path_factory.mktemp("serve")
    catalog = served_catalog(tiny_catalog, folder)
    base = serve_http
    config = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=base, max_upload_bytes=200_000)
    secured = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=base + "/secure",
                          api_keys=("sk-test-key",), limits=SECURE_LIMITS)
    serve.run(build_app(config), name="rf", route_prefix="/")
    serve.run(build_app(secured, model_names=[]), name="rf-secure", route_prefix="/secure")
    server = Server(base)
    server.store = folder / "store"
    return server


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
    error = assert_openai_error(r.json(), status)
    assert error["code"] == code and error["param"] == param  # malformed JSON names no field (nor a character offset)


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
    ("images/generations", {"prompt": "x", "seed": 2**63 - 1, "n": 2}, "invalid_seed"),
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
    error = assert_openai_error(r.json(), 400)
    assert error["code"] == code, r.text
    assert str(server.store) not in error["message"] and "/uploads/" not in error["message"], r.text  # no server paths


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


def test_burst_answers_503_fast_and_keeps_only_returned_images(server):
    """100 concurrent requests (n=1 or 2) at a model that holds 2 rows: the gateway admits them all, the model's
    handle refuses what it cannot hold, and those callers get OpenAI-shaped 503s with Retry-After at once.

    A request that fails keeps nothing: its sibling calls are cancelled, outputs it already stored are deleted,
    and a sibling already rendering finishes on its replica, which deletes the output (nobody will claim it).
    So afterwards the store holds exactly the images returned."""
    before = settled_outputs(server.store)
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=100))  # a hung socket fails the test

    def one(i: int) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        r = http.post(server + "/v1/images/generations",
                      json={"model": "tiny-lcm", "prompt": f"burst {i}", "size": "256x256", "num_inference_steps": 4,
                            "n": 1 + i % 2})
        return r, time.monotonic() - started

    with http, ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(one, range(100)))
    statuses = [r.status_code for r, _ in answers]
    rejected = [seconds for r, seconds in answers if r.status_code == 503]
    served = [seconds for r, seconds in answers if r.status_code == 200]
    print(f"\nburst of 100 at 127.0.0.1: {len(rejected)} got 503 ({percentiles(rejected)}); "
          f"{len(served)} got 200 ({percentiles(served)})")
    assert set(statuses) <= {200, 503} and rejected, statuses
    for r, _ in answers:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1", r.headers
            assert assert_openai_error(r.json(), 503)["code"] == "overloaded"
    returned = sum(len(r.json()["data"]) for r, _ in answers if r.status_code == 200)

    # One more request through the same replica: batches run one at a time there, so when it returns, every
    # render the burst started has ended (and abandoned outputs have been deleted).
    def follow_up() -> bool:
        r = httpx.post(server + "/v1/images/generations", json={"model": "tiny-lcm", "prompt": "after", "size": "64x64"},
                       timeout=60)
        assert r.status_code in (200, 503), r.text
        return r.status_code == 200

    wait_for(follow_up, 60, "tiny-lcm never answered 200 after the burst")
    wait_for(lambda: len(stored_outputs(server.store) - before) == returned + 1, 20,
             f"the store should hold the {returned} images returned plus the follow-up's")


def test_seed_range_is_checked_before_anything_renders(server):
    """Image i renders with seed+i: the last seed must fit in int64, checked at the boundary, so nothing renders."""
    before = settled_outputs(server.store)
    r = httpx.post(server + "/v1/images/generations", timeout=60,
                   json={"model": "tiny-sd", "prompt": "x", "size": "64x64", "seed": 2**63 - 1, "n": 2})
    assert r.status_code == 400, r.text
    error = assert_openai_error(r.json(), 400)
    assert (error["code"], error["param"]) == ("invalid_seed", "seed"), error
    assert settled_outputs(server.store) == before
    r = httpx.post(server + "/v1/images/generations", timeout=60,
                   json={"model": "tiny-sd", "prompt": "x", "size": "64x64", "seed": 2**63 - 2, "n": 2})
    assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text


@pytest.mark.parametrize("token", ["%C3%A9.%C3%A9", "%C3%A9", "abc", "abc.def", "a.b.c", "%00.%00", "e30." + "0" * 64,
                                   "x" * 4000 + "." + "%F0%9F%98%80" * 10])
def test_malformed_file_links_are_403(server, token):
    r = httpx.get(f"{server}/v1/files/{token}", timeout=30)
    assert r.status_code == 403, r.text
    assert assert_openai_error(r.json(), 403)["code"] == "invalid_token"


def test_signed_but_malformed_tokens_are_403():
    """A token with a valid signature over a payload that is not ours (bad base64, not JSON, not a dict) is refused."""
    from cluster.api import APIError
    from cluster.links import make_token, read_token, sign

    secret, ttl = "s3cret", 3600
    assert read_token(secret, make_token(secret, "/unused/x.png", ttl)) == "/unused/x.png"
    payloads = ["!!!", base64.urlsafe_b64encode(b"not json").decode(), base64.urlsafe_b64encode(b"[1, 2]").decode(),
                base64.urlsafe_b64encode(b'{"u": 1, "e": 2}').decode(), base64.urlsafe_b64encode(b'{"u": "x"}').decode(),
                base64.urlsafe_b64encode(b'"text"').decode(), "\u00e9"]
    for payload in payloads:
        with pytest.raises(APIError) as e:
            read_token(secret, f"{payload}.{sign(secret, payload)}")
        assert (e.value.status, e.value.code) == (403, "invalid_token"), payload
    with pytest.raises(APIError) as e:
        read_token(secret, make_token(secret, "/unused/x.png", ttl, now=time.time() - 2 * ttl))
    assert e.value.code == "expired_token"


def multipart(fields: dict[str, str], boundary: str = "rfboundary") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


FORM = {"content-type": "multipart/form-data; boundary=rfboundary"}
ERROR_REQUESTS = [
    ("GET", "/no/such/route", {}, 404, "not_found"),
    ("GET", "/v1/images/generations", {}, 405, "method_not_allowed"),
    ("DELETE", "/v1/models", {}, 405, "method_not_allowed"),
    ("POST", "/v1/images/generations", {"content": b'{"prompt": "x", "n": 1,', "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    ("POST", "/v1/images/generations", {"content": b"\xff\xfe\x00garbage"}, 400, "invalid_json"),
    ("POST", "/v1/images/generations", {"content": b"[1, 2, 3]"}, 400, "invalid_value"),
    ("POST", "/v1/images/generations", {"content": b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'}, 413, "request_too_large"),
    ("POST", "/v1/images/edits", {"content": b"--rfboundary\r\nnot a part", "headers": FORM}, 400, "invalid_request"),
    ("POST", "/v1/images/edits", {"content": b"junk", "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_request"),
    ("POST", "/v1/images/edits", {"content": multipart({"prompt": "x" * 250_000}), "headers": FORM}, 400, "invalid_request"),
    ("POST", "/v1/images/edits", {"content": b"x" * (2 * 200_000 + 1024 * 1024 + 1), "headers": FORM}, 413, "request_too_large"),
]


@pytest.mark.parametrize("method, path, kwargs, status, code", ERROR_REQUESTS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in ERROR_REQUESTS])
def test_every_status_has_the_openai_error_shape(server, method, path, kwargs, status, code):
    r = httpx.request(method, server + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = assert_openai_error(r.json(), status)
    assert error["code"] == code, error
    if code == "invalid_json":
        assert error["param"] is None, error


def test_openapi_documents_the_errors_sent(server):
    """Every operation documents 400 (and every other status) with the error shape; none documents 422."""
    schema = httpx.get(server + "/openapi.json", timeout=30).json()
    assert "ErrorResponse" in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status in ("400", "default"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, status)
    edit = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "image" in edit["required"] and "prompt" in edit["properties"]


def test_metrics_and_schema_need_the_key_when_keys_are_set(server):
    key = {"Authorization": "Bearer sk-test-key"}
    for path in ("/metrics", "/openapi.json"):
        r = httpx.get(server + "/secure" + path, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert assert_openai_error(r.json(), 401)["code"] == "invalid_api_key"
        assert httpx.get(server + "/secure" + path, headers=key, timeout=30).status_code == 200, path
    assert httpx.get(server + "/secure/healthz", timeout=30).json() == {"status": "ok"}


def png_bytes(size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_edit_errors_name_fields_and_uploads_are_deleted(server):
    """Errors about uploads name the form field, never a server path; no upload outlives its request."""
    url = server + "/v1/images/edits"
    form = {"prompt": "x", "model": "tiny-sd-img2img"}
    for files, field in [({"image": ("a.png", b"not an image", "image/png")}, "image"),
                         ({"image": ("a.png", png_bytes(), "image/png"), "mask": ("m.png", b"\x89PNG junk", "image/png")}, "mask")]:
        r = httpx.post(url, data=form, files=files, timeout=120)
        assert r.status_code == 400, r.text
        error = assert_openai_error(r.json(), 400)
        assert error["code"] == "invalid_input" and error["message"].startswith(f"invalid_input: {field} "), error
        assert "/" not in error["message"].split(":", 2)[1] and "uploads" not in error["message"], error
    r = httpx.post(url, data=form, files={"image": ("a.png", png_bytes(), "image/png")}, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(url, data={**form, "n": "99"}, files={"image": ("a.png", png_bytes(), "image/png")}, timeout=120)
    assert r.status_code == 400, r.text
    uploads = server.store / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())
