"""Memory and speed policies on CPU: each one is in place (hooks, modules, dtype, compiled blocks) and the
output still matches the plain pipeline; per-job overrides reach the pool; the budget follows the GPU share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.model_pool import ModelPool, PoolOptions, share_budget
from pipelines.catalog import Catalog, CatalogError, Policy, parse_overrides
from pipelines.loading import load_base, pick_dtype
from pipelines.placement import choose_offload, denoiser, group_offload, place

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
CPU = torch.device("cpu")
TOLERANCE = 1e-4  # float32 images in [0, 1]; layout and chunking only reorder float sums


@pytest.fixture(scope="module")
def sd_source(tiny_catalog) -> str:
    return Catalog.load(tiny_catalog).pipeline("tiny-sd").source


def fresh(source: str, dtype: str = "float32"):
    """A newly loaded tiny SD pipeline (policies change it in place)."""
    return load_base(source, None, pick_dtype(dtype, CPU))


def render(pipe, batch: int = 1) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(["a cat"] * batch, num_inference_steps=2, width=64, height=64, generator=generator,
                output_type="np").images


@pytest.fixture(scope="module")
def plain(sd_source) -> dict[int, np.ndarray]:
    """The plain pipeline's outputs (batch 1 and 2), what every policy must still produce."""
    pipe = fresh(sd_source)
    return {1: render(pipe), 2: render(pipe, 2)}


def close(a: np.ndarray, b: np.ndarray, tol: float = TOLERANCE) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= tol


# -- catalog and overrides -------------------------------------------------------------------------------


def test_catalog_takes_the_new_keys_and_refuses_bad_values(tmp_path):
    spec = {"source": str(tmp_path), "policy": {"offload": "auto", "group_blocks": 2, "ff_chunking": True,
                                                "channels_last": True, "compile": "regional", "compile_mode": "max-autotune"}}
    policy = Catalog.from_dict({"models": {"m": spec}}, tmp_path).get("m").policy
    assert (policy.offload, policy.group_blocks, policy.compile, policy.compile_mode) == ("auto", 2, "regional", "max-autotune")
    for bad in ({"offload": "disk"}, {"compile": "yes"}, {"group_blocks": -1}, {"ff_chunking": "true"}, {"turbo": True}):
        with pytest.raises(CatalogError, match=next(iter(bad))):
            Catalog.from_dict({"models": {"m": {"source": str(tmp_path), "policy": bad}}}, tmp_path)


def test_overrides_are_typed_and_checked():
    assert parse_overrides(["offload=group", "channels_last=yes", "group_blocks= 3"]) == {
        "offload": "group", "channels_last": "yes", "group_blocks": "3"}
    policy = Policy(vae_tiling=True).overridden({"offload": "group", "channels_last": "yes", "group_blocks": "3"})
    assert policy == Policy(offload="group", channels_last=True, group_blocks=3, vae_tiling=True)
    for bad, match in ((["offload"], "KEY=VALUE"), (["speed=fast"], "unknown policy key"), (["compile=maybe"], "compile"),
                       (["ff_chunking=2"], "expected bool"), (["group_blocks=x"], "expected int")):
        with pytest.raises(CatalogError, match=match):
            parse_overrides(bad)


def test_cli_refuses_a_bad_policy_before_ray_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "render", str(tmp_path / "m.parquet"), "--out", str(tmp_path),
                           "--policy", "offload=floppy"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "offload" in done.stderr + done.stdout


# -- each policy applied, output unchanged ----------------------------------------------------------------


def test_plain_placement_keeps_sdpa(sd_source, plain):
    pipe = fresh(sd_source)
    placed = place(pipe, Policy(), CPU)
    assert placed.offload == "none" and placed.applied == [] and placed.device_bytes > 0
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert close(render(pipe), plain[1])


def test_group_offload_installs_hooks_and_matches(sd_source, plain):
    for blocks in (1, 0):  # block level, leaf level
        pipe = fresh(sd_source)
        group_offload(pipe, CPU, blocks)  # CPU onload: the same hooks an accelerator gets, minus streams
        for name in ("unet", "text_encoder"):
            assert hooked(getattr(pipe, name)), (blocks, name)
        assert not hooked(pipe.vae)  # resident: fp16 SDXL re-casts it for decoding, which the hooks do not follow
        assert len(hooked(pipe.unet)) > 1
        assert close(render(pipe), plain[1])


def hooked(model: torch.nn.Module) -> list[str]:
    """The modules of `model` that carry diffusers' group-offloading hook."""
    return [n for n, m in model.named_modules() if "group_offloading" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


def test_offload_on_cpu_is_skipped_with_a_warning(sd_source, plain, caplog):
    pipe = fresh(sd_source)
    for offload in ("model", "sequential", "group"):
        caplog.clear()
        assert place(pipe, Policy(offload=offload), CPU).offload == "none"
        assert f"offload={offload} ignored" in caplog.text
    assert place(fresh(sd_source), Policy(offload="auto"), CPU, free_bytes=1).offload == "none"  # no accelerator
    assert not hooked(pipe.unet) and close(render(pipe), plain[1])


def test_auto_offload_follows_free_memory():
    sizes = {"unet": 600, "text_encoder": 200, "vae": 100}
    assert choose_offload(sizes, free_bytes=2000) == "none"
    assert choose_offload(sizes, free_bytes=1000) == "model"  # 900 > 750 room, the 600-byte unet fits
    assert choose_offload(sizes, free_bytes=500) == "group"


def test_feed_forward_chunking(sd_source, plain):
    pipe = fresh(sd_source)
    placed = place(pipe, Policy(ff_chunking=True), CPU)
    blocks = [m for m in pipe.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    assert "ff_chunking" in placed.applied and blocks
    assert all((b._chunk_size, b._chunk_dim) == (1, 0) for b in blocks)
    assert close(render(pipe, 2), plain[2])


def test_channels_last(sd_source, plain):
    pipe = fresh(sd_source)
    place(pipe, Policy(channels_last=True), CPU)
    for model in (pipe.unet, pipe.vae):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert close(render(pipe), plain[1])


def test_slicing_and_tiling(sd_source, plain):
    pipe = fresh(sd_source)
    placed = place(pipe, Policy(attention_slicing=True, vae_slicing=True, vae_tiling=True), CPU)
    assert placed.applied == ["attention_slicing", "vae_slicing", "vae_tiling"]
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert close(render(pipe, 2), plain[2])  # 64x64 is under the tile size: tiling leaves it as it is


def test_dtype_from_the_catalog(sd_source, plain):
    pipe = fresh(sd_source, "bfloat16")
    place(pipe, Policy(), CPU)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.bfloat16}
    assert close(render(pipe), plain[1], tol=0.1)  # bfloat16 keeps 8 bits of mantissa


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compile(sd_source, plain, mode):
    torch._dynamo.reset()
    pipe = fresh(sd_source)
    placed = place(pipe, Policy(compile=mode, compile_backend="eager"), CPU)  # eager: dynamo without C++ builds
    assert placed.compiled == mode and f"compile:{mode}" in placed.applied
    compiled = [n for n, m in pipe.unet.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    if mode == "regional":  # every repeated block, and not the UNet itself
        blocks = [n for n, m in pipe.unet.named_modules() if type(m).__name__ in pipe.unet._repeated_blocks]
        assert compiled == blocks and len(blocks) > 1
    else:
        assert compiled == [""]
    assert placed.compile_s is not None and placed.compile_s > 0  # the warm-up compiled, measured apart
    assert denoiser(pipe) is pipe.unet and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert close(render(pipe), plain[1])


# -- the pool: per-job overrides, figures, budget ---------------------------------------------------------


def test_pool_applies_job_overrides_and_reports_compile_apart(tiny_catalog):
    catalog = Catalog.load(tiny_catalog)
    options = PoolOptions(policy={"ff_chunking": "true", "compile": "regional", "compile_backend": "eager"})
    pool = ModelPool(catalog, CPU, 2**30, options=options)
    entry = catalog.pipeline("tiny-sd")
    pipe = pool.pipeline(entry)
    assert pool.policy(entry).ff_chunking and not entry.policy.ff_chunking
    assert all(b._chunk_size == 1 for b in pipe.unet.modules() if hasattr(b, "set_chunk_feed_forward"))
    figures = pool.figures["tiny-sd"]
    assert figures["compiled"] == "regional" and figures["compile_s"] > 0 and figures["load_s"] >= 0
    assert pool.compile_s() >= figures["compile_s"]


def test_budget_follows_the_gpu_share():
    assert share_budget(100 * 2**30) == 80 * 2**30
    assert share_budget(100 * 2**30, 0.5) == 40 * 2**30
    assert share_budget(100 * 2**30, 0.25) == 20 * 2**30
    assert share_budget(100 * 2**30, 2.0) == 80 * 2**30  # several devices: one device's worth each


PLACEMENT_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from cluster.model_pool import PoolOptions, share_budget
    from cluster.resources import node_resources, plan_workers

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=sys.argv[1],
             object_store_memory=100 * 2**20, log_to_driver=False)
    plan = plan_workers(node_resources(), None, 0.5)

    @ray.remote
    class Probe:
        def __init__(self, options):
            self.options = options

        def where(self):
            ctx = ray.get_runtime_context()
            return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "gpu": ctx.get_assigned_resources().get("GPU"),
                    "budget": share_budget(80 * 2**30, self.options.gpu_share)}

    actors = [Probe.options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus).remote(PoolOptions(gpu_share=plan.num_gpus))
              for _ in range(plan.workers)]
    found = ray.get([a.where.remote() for a in actors], timeout=60)
    print(json.dumps({"workers": plan.workers, "num_gpus": plan.num_gpus, "actors": found,
                      "gpus_left": ray.available_resources().get("GPU", 0.0)}))
    ray.shutdown()
""")


def test_half_a_gpu_places_two_actors_per_device():
    """A fake 1-GPU Ray cluster (its own, in a subprocess): --gpus-per-worker 0.5 plans two actors on the one device."""
    temp = tempfile.mkdtemp(prefix="rf-gpu-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", PLACEMENT_SCRIPT, temp], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    found = json.loads(out.strip().splitlines()[-1])
    assert (found["workers"], found["num_gpus"]) == (2, 0.5)
    assert [a["gpu_ids"] for a in found["actors"]] == [["0"], ["0"]]  # both on the same device
    assert [a["gpu"] for a in found["actors"]] == [0.5, 0.5] and found["gpus_left"] == 0.0
    assert {a["budget"] for a in found["actors"]} == {32 * 2**30}  # half of 80% of the 80 GiB device each
