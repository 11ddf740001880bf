"""Tests for pipelines.tiny.edits: edit pipelines, ControlNets, LoRAs and an embedding, via diffusers' loaders."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DiffusionPipeline, MultiControlNetModel
from PIL import Image
from safetensors.torch import load_file

from helpers import load_pipeline
from pipelines.catalog import Catalog
from pipelines.tiny import TINY_MODELS, build_tiny_models, write_spec
from pipelines.tiny.edits import EDIT_MODELS, EMBEDDING_FILE, EMBEDDING_TOKEN, LORA_FILE

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

BASE_MODELS = ["tiny-sd", "tiny-sdxl"]
SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd and tiny-sdxl through build_tiny_models, then every edit spec that writes a directory."""
    root = tmp_path_factory.mktemp("tiny-edits")
    build_tiny_models(root, BASE_MODELS)
    for name, spec in EDIT_MODELS.items():
        if spec.write is not None:
            write_spec(spec, root / name)
    return root


@pytest.fixture(scope="module")
def catalog(root: Path) -> Catalog:
    """The catalog these specs would produce once registered, validated by the real catalog parser."""
    models = {name: {"source": name, **TINY_MODELS[name].entry} for name in BASE_MODELS}
    models.update({name: {"source": name, **spec.entry} for name, spec in EDIT_MODELS.items()})
    return Catalog.from_dict({"default_model": "tiny-sd", "models": models}, base_dir=root)


def _load(catalog: Catalog, name: str) -> DiffusionPipeline:
    """Loads a pipeline entry like pipelines.loading does, handing its ControlNets to `pipeline_class`."""
    entry = catalog.pipeline(name)
    extra: dict[str, Any] = {}
    if entry.controlnets:
        nets = [ControlNetModel.from_pretrained(catalog.get(n).source) for n in entry.controlnets]
        extra["controlnet"] = nets[0] if len(nets) == 1 else nets
    return load_pipeline(entry.source, entry.pipeline_class, **extra)


class _Pipes(dict):
    """Pipeline entries loaded on first use, so a test run that selects one test loads only what it needs."""

    def __init__(self, catalog: Catalog):
        super().__init__()
        self.catalog = catalog

    def __missing__(self, name: str) -> DiffusionPipeline:
        self[name] = _load(self.catalog, name)
        return self[name]


@pytest.fixture(scope="module")
def pipes(catalog: Catalog) -> _Pipes:
    """Each pipeline entry, loaded once for the module (LoRA and embedding tests load their own)."""
    return _Pipes(catalog)


def _image(seed: int) -> Image.Image:
    """Random 8x8 colour blocks: a random VAE maps per-pixel noise images to nearly the same latents."""
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def _mask(box: tuple[int, int, int, int] | None) -> Image.Image:
    """White (repaint) inside `box` (x0, y0, x1, y1), black (keep) elsewhere; None = all black."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def _tensor(*images: Image.Image) -> torch.Tensor:
    """A (B, 3, H, W) float batch in [0, 1]: how a per-prompt control image batch reaches one ControlNet."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])


def _render(
    pipe: DiffusionPipeline, catalog: Catalog, name: str, prompt: str | list[str], seeds: list[int], **kwargs: Any
) -> np.ndarray:
    """Renders with `name`'s defaults (but 2 steps), one CPU generator per seed; returns (N, H, W, 3) ints."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    params = {**catalog.get(name).defaults, "num_inference_steps": STEPS, **kwargs}
    images = pipe(prompt, generator=generators[0] if len(generators) == 1 else generators, **params).images
    assert all(im.size == (SIZE, SIZE) for im in images)
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Batched and single calls round differently: at most 1 (8-bit) apart."""
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) > 8


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- catalog and builds ------------------------------------------------------------------------


def test_entries_validate_and_point_at_built_dirs(catalog: Catalog, root: Path) -> None:
    for name, spec in EDIT_MODELS.items():
        entry = catalog.get(name)
        assert ("source" in spec.entry) == (spec.write is None), name
        assert Path(entry.source).is_dir(), name
        assert entry.source == str((root / spec.entry.get("source", name)).resolve())
        assert entry.kind == spec.entry.get("kind", "pipeline")
        if entry.kind == "pipeline":
            assert hasattr(getattr(diffusers, entry.pipeline_class), "from_pipe"), name
    multi = catalog.get("tiny-sd-multicontrolnet")
    assert multi.controlnets == ("tiny-controlnet-sd", "tiny-controlnet-sd-2")
    assert catalog.get("tiny-embedding-sd").token == EMBEDDING_TOKEN
    assert catalog.get("tiny-pix2pix").defaults["image_guidance_scale"] == 1.5
    edits = ("tiny-sd-img2img", "tiny-sd-inpaint", "tiny-sd-inpaint-9ch", "tiny-pix2pix")
    assert {catalog.get(n).tasks for n in edits} == {("edit",)}


def test_written_dirs_are_safetensors_only(root: Path) -> None:
    for name, spec in EDIT_MODELS.items():
        if spec.write is None:
            continue
        files = [p for p in (root / name).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), name
        assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")], name
    assert (root / "tiny-lora-sd" / LORA_FILE).is_file()
    assert (root / "tiny-embedding-sd" / EMBEDDING_FILE).is_file()


@pytest.mark.parametrize("name", ["tiny-controlnet-sd", "tiny-lora-sd", "tiny-embedding-sd"])
def test_rebuild_is_byte_identical_and_seeds_differ(name: str, root: Path, tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # a caller's RNG state must not matter
        EDIT_MODELS[name].write(tmp_path / name)
    built = sorted((root / name).rglob("*.safetensors"))
    assert built
    for weights in built:
        assert _sha256(tmp_path / name / weights.relative_to(root / name)) == _sha256(weights)
    sibling = {"tiny-controlnet-sd": "tiny-controlnet-sd-2", "tiny-lora-sd": "tiny-lora-sd-2"}.get(name)
    if sibling:
        assert _sha256(root / sibling / built[0].relative_to(root / name)) != _sha256(built[0])


@pytest.mark.parametrize("name", ["tiny-sd-inpaint-9ch", "tiny-pix2pix"])
def test_own_dir_edit_models_share_tiny_sd_vae_and_text_encoder(name: str, root: Path) -> None:
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        ours, theirs = load_file(root / name / part), load_file(root / "tiny-sd" / part)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{name}/{part} differs from tiny-sd"


# --- edit pipelines ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "in_channels"),
    [
        ("tiny-sd-img2img", "StableDiffusionImg2ImgPipeline", 4),
        ("tiny-sd-inpaint", "StableDiffusionInpaintPipeline", 4),
        ("tiny-sd-inpaint-9ch", "StableDiffusionInpaintPipeline", 9),
        ("tiny-pix2pix", "StableDiffusionInstructPix2PixPipeline", 8),
    ],
)
def test_edit_single_and_batch(name: str, cls: str, in_channels: int, pipes: dict, catalog: Catalog) -> None:
    pipe = pipes[name]
    assert type(pipe).__name__ == cls
    assert pipe.unet.config.in_channels == in_channels
    inpaint = "inpaint" in name
    box = (16, 16, 48, 48)
    extra = (lambda m: {"mask_image": m}) if inpaint else (lambda m: {})
    im1, im2 = _image(1), _image(2)

    first = _render(pipe, catalog, name, "a cat", [1], image=im1, **extra(_mask(box)))
    again = _render(pipe, catalog, name, "a cat", [1], image=im1, **extra(_mask(box)))
    assert np.array_equal(first, again), "same seed and inputs must give identical pixels"
    other_image = _render(pipe, catalog, name, "a cat", [1], image=im2, **extra(_mask(box)))
    assert _differ(first, other_image), "the input image must matter"

    second = _render(pipe, catalog, name, "a dog", [2], image=im2, **extra(_mask((0, 0, 32, 64))))
    batch = _render(
        pipe, catalog, name, ["a cat", "a dog"], [1, 2],
        image=[im1, im2], **extra([_mask(box), _mask((0, 0, 32, 64))]),
    )
    assert len(batch) == 2
    assert _close(batch[:1], first) and _close(batch[1:], second), "per-item images and generators"


def test_img2img_strength_matters(pipes: dict, catalog: Catalog) -> None:
    pipe, name = pipes["tiny-sd-img2img"], "tiny-sd-img2img"
    a = _render(pipe, catalog, name, "a cat", [1], image=_image(1), strength=0.75, num_inference_steps=4)
    b = _render(pipe, catalog, name, "a cat", [1], image=_image(1), strength=0.3, num_inference_steps=4)
    assert _differ(a, b)


def test_inpaint_4ch_keeps_black_mask_area(pipes: dict, catalog: Catalog) -> None:
    """The 4-channel path pastes the (noised) input latents back outside the mask every step."""
    pipe, name = pipes["tiny-sd-inpaint"], "tiny-sd-inpaint"
    keep_all = [
        _render(pipe, catalog, name, p, [1], image=_image(1), mask_image=_mask(None)) for p in ("a cat", "a dog")
    ]
    assert np.array_equal(*keep_all), "an all-black mask keeps every latent: the prompt cannot matter"
    full = (0, 0, SIZE, SIZE)
    repaint = [
        _render(pipe, catalog, name, p, [1], image=_image(1), mask_image=_mask(full)) for p in ("a cat", "a dog")
    ]
    assert _differ(*repaint)


def test_inpaint_9ch_mask_matters(pipes: dict, catalog: Catalog) -> None:
    pipe, name = pipes["tiny-sd-inpaint-9ch"], "tiny-sd-inpaint-9ch"
    a = _render(pipe, catalog, name, "a cat", [1], image=_image(1), mask_image=_mask((0, 0, 32, 64)))
    b = _render(pipe, catalog, name, "a cat", [1], image=_image(1), mask_image=_mask((32, 0, 64, 64)))
    assert _differ(a, b)


def test_pix2pix_image_guidance_scale_matters(pipes: dict, catalog: Catalog) -> None:
    pipe, name = pipes["tiny-pix2pix"], "tiny-pix2pix"
    a = _render(pipe, catalog, name, "make it blue", [1], image=_image(1), image_guidance_scale=1.5)
    b = _render(pipe, catalog, name, "make it blue", [1], image=_image(1), image_guidance_scale=3.0)
    assert _differ(a, b)


# --- ControlNet --------------------------------------------------------------------------------

BLACK = Image.new("RGB", (SIZE, SIZE))
HALF = Image.fromarray(np.repeat(np.repeat([[[255, 255, 255], [0, 0, 0]]], SIZE, 0), SIZE // 2, 1).astype(np.uint8))
"""Left half white, right half black."""


@pytest.mark.parametrize(
    ("name", "base"), [("tiny-sd-controlnet", "tiny-sd"), ("tiny-sdxl-controlnet", "tiny-sdxl")]
)
def test_controlnet_single(name: str, base: str, pipes: dict, catalog: Catalog) -> None:
    pipe = pipes[name]
    assert type(pipe).__name__ == catalog.get(name).pipeline_class
    assert isinstance(pipe.controlnet, ControlNetModel)
    def one(scale: float = 1.0, image: Image.Image = HALF) -> np.ndarray:
        return _render(pipe, catalog, name, "a cat", [1], image=image, controlnet_conditioning_scale=scale)

    a = one()
    assert np.array_equal(a, one()), "same seed and control image must give identical pixels"
    assert _differ(a, one(image=_image(3))), "the control image must matter"
    assert _differ(a, one(scale=0.5)), "the conditioning scale must matter"
    # Scale 0 adds exactly-zero residuals: the plain text-to-image output of the base pipeline.
    zero = one(scale=0.0)
    plain = _render(pipes[base], catalog, base, "a cat", [1])
    assert np.array_equal(zero, plain)
    # Two prompts, one control image each (a list), per-prompt generators.
    b = _render(pipe, catalog, name, "a dog", [2], image=BLACK)
    batch = _render(pipe, catalog, name, ["a cat", "a dog"], [1, 2], image=[HALF, BLACK])
    assert _close(batch[:1], a) and _close(batch[1:], b)


@pytest.mark.parametrize(("name", "nets"), [("tiny-sd-multicontrolnet", None), ("tiny-sdxl-controlnet", 2)])
def test_multicontrolnet(name: str, nets: int | None, pipes: dict, catalog: Catalog) -> None:
    if nets:  # tiny-sdxl has one ControlNet: use it twice, as from_pipe(controlnet=[m, m]).
        single = pipes[name]
        pipe = type(single).from_pipe(single, controlnet=[single.controlnet] * nets)
        pipe.set_progress_bar_config(disable=True)
        first_alone = single
    else:
        pipe = pipes[name]
        first_alone = pipes["tiny-sd-controlnet"]
    assert isinstance(pipe.controlnet, MultiControlNetModel) and len(pipe.controlnet.nets) == 2
    ctrl = _image(3)
    only_first = _render(
        pipe, catalog, name, "a cat", [1], image=[HALF, ctrl], controlnet_conditioning_scale=[1.0, 0.0]
    )
    alone = _render(first_alone, catalog, name, "a cat", [1], image=HALF, controlnet_conditioning_scale=1.0)
    assert np.array_equal(only_first, alone), "a 0.0 scale must switch the second ControlNet off exactly"
    scales = [1.0, 0.5]
    a = _render(pipe, catalog, name, "a cat", [1], image=[HALF, ctrl], controlnet_conditioning_scale=scales)
    assert _differ(a, only_first)
    b = _render(pipe, catalog, name, "a dog", [2], image=[BLACK, HALF], controlnet_conditioning_scale=scales)
    # Per-prompt control images for several ControlNets: one (B, 3, H, W) batch per ControlNet (SD and SDXL).
    batch = _render(
        pipe, catalog, name, ["a cat", "a dog"], [1, 2],
        image=[_tensor(HALF, BLACK), _tensor(ctrl, HALF)], controlnet_conditioning_scale=scales,
    )
    assert _close(batch[:1], a) and _close(batch[1:], b)
    if not nets:
        # SD (not SDXL) also takes nested lists, outer = prompt, inner = ControlNet.
        nested = _render(
            pipe, catalog, name, ["a cat", "a dog"], [1, 2],
            image=[[HALF, ctrl], [BLACK, HALF]], controlnet_conditioning_scale=scales,
        )
        assert _close(nested[:1], a) and _close(nested[1:], b)


# --- LoRA --------------------------------------------------------------------------------------


def test_lora_load_switch_disable_unload(catalog: Catalog) -> None:
    pipe = _load(catalog, "tiny-sd")
    name = "tiny-sd"
    lora_a, lora_b = catalog.get("tiny-lora-sd").source, catalog.get("tiny-lora-sd-2").source

    def render() -> np.ndarray:
        return _render(pipe, catalog, name, "a cat", [1])

    base = render()
    pipe.load_lora_weights(lora_a, adapter_name="a")
    only_a = render()
    assert _differ(only_a, base)
    pipe.unload_lora_weights()
    assert np.array_equal(render(), base), "unload_lora_weights restores the base exactly"
    pipe.load_lora_weights(lora_b, adapter_name="b")
    only_b = render()
    assert _differ(only_b, only_a)

    pipe.load_lora_weights(lora_a, adapter_name="a")  # both cached now; the latest load is the active one
    assert pipe.get_list_adapters() == {"unet": ["b", "a"]}
    assert np.array_equal(render(), only_a)
    pipe.set_adapters(["b"], adapter_weights=[1.0])
    assert np.array_equal(render(), only_b)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    mixed = render()
    assert _differ(mixed, only_a) and _differ(mixed, only_b)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 0.0])
    assert np.array_equal(render(), base), "zero weights give the base exactly"

    pipe.disable_lora()
    assert np.array_equal(render(), base), "disable_lora gives the base exactly"
    pipe.enable_lora()  # set_adapters alone does not undo disable_lora
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    assert np.array_equal(render(), only_a)

    pipe.delete_adapters(["a"])  # LRU eviction of one adapter
    assert pipe.get_list_adapters() == {"unet": ["b"]}
    pipe.set_adapters(["b"], adapter_weights=[1.0])
    assert np.array_equal(render(), only_b)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    assert np.array_equal(render(), base)


# --- textual inversion -------------------------------------------------------------------------


def test_textual_inversion_load_render_unload(catalog: Catalog, root: Path) -> None:
    pipe = _load(catalog, "tiny-sd")
    entry = catalog.get("tiny-embedding-sd")
    token = entry.token
    prompt = f"a {token} cat"
    vocab, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0]

    def render(text: str) -> np.ndarray:
        return _render(pipe, catalog, "tiny-sd", text, [1])

    base, before = render("a cat"), render(prompt)
    pipe.load_textual_inversion(entry.source, token=token)
    (token_id,) = pipe.tokenizer(token, add_special_tokens=False).input_ids
    saved = load_file(Path(entry.source) / EMBEDDING_FILE)[token][0]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(), saved)
    styled = render(prompt)
    assert _differ(styled, before)
    assert np.array_equal(render("a cat"), base), "prompts without the token are unaffected"

    pipe.unload_textual_inversion(token)
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows
    assert np.array_equal(render(prompt), before), "after unloading, the token is plain text again"

    pipe.load_textual_inversion(str(Path(entry.source) / EMBEDDING_FILE))  # a file; token from its key
    assert np.array_equal(render(prompt), styled)
    pipe.unload_textual_inversion()
    assert np.array_equal(render(prompt), before)
