"""Fuzzing the online endpoint: requests generated from its own OpenAPI schema (schemathesis: valid and invalid
bodies, paths, headers) and junk bodies (hypothesis), sent to a real Serve app. No 5xx, every error OpenAI-shaped.

Bounded (about 230 requests, about 10 s of fuzzing here). The seed is printed: set RENDERFLEET_FUZZ_SEED to it
to replay a run."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from serve_helpers import assert_openai_error, serve_catalog

pytestmark = pytest.mark.timeout(400)

SEED = int(os.environ.get("RENDERFLEET_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
PER_OPERATION = 15  # examples per operation and generation mode (2 modes)
JUNK_EXAMPLES = 60  # junk bodies across the POST routes
POST_ROUTES = ["/v1/images/generations", "/v1/videos/generations", "/v1/audio/generations", "/v1/meshes/generations",
               "/v1/images/edits"]


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck))


class Endpoint(str):
    """The app's base URL, knowing its local store."""

    store: Path


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_catalog, serve_http) -> Endpoint:
    """A small app: tiny-sd and its img2img sibling, limits tight enough that any valid request renders fast."""
    from ray import serve

    from cluster.serve_app import ServeConfig, build_app
    from storage.params import Limits

    folder = tmp_path_factory.mktemp("serve-fuzz")
    quick = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 8, "max_ongoing_requests": 16, "max_queued_requests": 64}
    catalog = serve_catalog(tiny_catalog, folder, {"tiny-sd": quick, "tiny-sd-img2img": quick})
    limits = Limits(max_steps=2, max_pixels=64 * 64, max_prompt_chars=300, max_frames=4, max_audio_s=1.0,
                    max_input_pixels=256 * 256)
    config = ServeConfig(catalog_path=catalog, store=str(folder / "store"), public_url=serve_http, limits=limits,
                         max_upload_bytes=100_000)
    serve.run(build_app(config), name="rf-fuzz", route_prefix="/")
    endpoint = Endpoint(serve_http)
    endpoint.store = folder / "store"
    return endpoint


SENT: Counter = Counter()


def check(response_status: int, body: bytes, content_type: str, what: str) -> None:
    """No 5xx; every error is OpenAI's shape."""
    SENT[response_status] += 1
    assert response_status < 500, f"{what} -> {response_status}: {body[:500]!r}"
    if response_status >= 400:
        assert content_type.startswith("application/json"), f"{what} -> {response_status} {content_type}: {body[:300]!r}"
        assert_openai_error(json.loads(body), response_status)


def test_fuzz_from_the_openapi_schema(endpoint):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    print(f"\nfuzz seed {SEED} (RENDERFLEET_FUZZ_SEED={SEED} replays it)")
    schema = schemathesis.openapi.from_dict(httpx.get(endpoint + "/openapi.json", timeout=30).json())
    started, operations, labels = time.monotonic(), 0, set()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        labels.add(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(SEED)
            @fuzz_settings(PER_OPERATION)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call(base_url=endpoint, timeout=60)
                content_type = ({k.lower(): v for k, v in response.headers.items()}.get("content-type") or [""])[0]
                check(response.status_code, response.content, content_type, case.as_curl_command()[:600])
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                         content_type_conformance, response_schema_conformance])

            try:
                run()
            except Unsatisfiable:  # no parameters or body to make invalid (GET /healthz, /metrics, /v1/models)
                assert mode == GenerationMode.NEGATIVE, operation.label
    print(f"schema fuzz: {sum(SENT.values())} requests over {operations} operations in {time.monotonic() - started:.0f} s; "
          f"statuses {dict(sorted(SENT.items()))}")
    expected = {"POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/videos", "GET /v1/videos/{job_id}",
                "GET /v1/videos/{job_id}/content", "DELETE /v1/videos/{job_id}", "GET /v1/models"}
    assert expected <= labels, sorted(labels)  # the async-job routes are fuzzed too
    assert sum(SENT.values()) >= 100


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
FIELDS = ["prompt", "model", "n", "size", "seed", "response_format", "output_format", "num_inference_steps",
          "guidance_scale", "strength", "negative_prompt", "user", "controlnet_conditioning_scale"]
# Objects with our field names (so validation gets past the first field), arbitrary JSON, or raw bytes.
JSON_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
)
FORM_VALUES = st.text(max_size=30) | st.integers(-5, 2**64).map(str) | st.sampled_from(["64x64", "tiny-sd-img2img", "url"])
UPLOADS = st.binary(max_size=500) | st.sampled_from([b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a", b""])


@st.composite
def junk_requests(draw) -> tuple[str, dict]:
    route = draw(st.sampled_from(POST_ROUTES))
    if route != "/v1/images/edits" or draw(st.booleans()) and draw(st.booleans()):
        headers = {"content-type": draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data",
                                                          "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"]))}
        return route, {"content": draw(JSON_BODIES), "headers": headers}
    data = draw(st.dictionaries(st.sampled_from(FIELDS), FORM_VALUES, max_size=6))
    files = {name: ("f.png", draw(UPLOADS), "image/png") for name in draw(st.sets(st.sampled_from(["image", "image[]", "mask"])))}
    return route, {"data": data, "files": files or None}


def test_fuzz_with_junk_bodies(endpoint):
    print(f"\nfuzz seed {SEED} (RENDERFLEET_FUZZ_SEED={SEED} replays it)")
    before = sum(SENT.values())

    @seed(SEED)
    @fuzz_settings(JUNK_EXAMPLES)
    @given(request=junk_requests())
    def run(request: tuple[str, dict]) -> None:
        route, kwargs = request
        r = httpx.post(endpoint + route, timeout=60, **kwargs)
        check(r.status_code, r.content, r.headers.get("content-type", ""), f"POST {route} {str(kwargs)[:300]}")

    run()
    print(f"junk fuzz: {sum(SENT.values()) - before} requests; all statuses so far {dict(sorted(SENT.items()))}")
    uploads = endpoint.store / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir()), "uploads outlived their requests"
