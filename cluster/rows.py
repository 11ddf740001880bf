"""Row checks and input assets: from a manifest row (or online request) to a render job.

Checks run in two steps. `check` needs no model: catalog lookups, the prompt policy, every
value bound, the output format and the input assets, so a block of bad rows loads nothing.
`complete` needs the loaded pipeline's signature: prompt or input image, class labels, native size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from cluster.model_pool import ModelPool
from pipelines.adapters import Embedding, Lora
from pipelines.catalog import Catalog, ModelEntry, UnknownModel
from pipelines.finishing import Finisher
from pipelines.inputs import InputError, decode_image, edit_size
from pipelines.loading import ModelLoadError, check_safetensors, default_size
from pipelines.media.formats import TASK_FORMATS
from pipelines.tasks import Request, call_parameters, takes_prompt
from storage.fs import is_remote, join, read_bytes
from storage.keys import id_hash
from storage.params import Limits, RowParams, check_size, resolve_row
from storage.reasons import RowError


class Filtered(Exception):
    """A row the safety policy stops; final (`status = filtered`), never retried."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Checked:
    """A row that passed every check that needs no model, with its input assets decoded."""

    index: int
    entry: ModelEntry
    params: RowParams
    image: Image.Image | None
    mask: Image.Image | None
    controls: list[Image.Image]


@dataclass
class Job:
    """A row ready to render: the pipeline's per-item request and the resolved output size."""

    index: int
    entry: ModelEntry
    params: RowParams
    request: Request
    width: int | None
    height: int | None

    @property
    def group(self) -> tuple:
        """Rows with the same group share one pipeline call."""
        p = self.params
        return (self.entry.name, p.task, self.width, self.height, p.call_values(), p.loras, p.embeddings)


class RowChecker:
    """Turns rows into jobs for one catalog, limits and input folder."""

    def __init__(self, catalog: Catalog, limits: Limits, finisher: Finisher, pool: ModelPool, input_base: str | None,
                 input_roots: tuple[str, ...] = ()):
        self.catalog = catalog
        self.limits = limits
        self.finisher = finisher
        self.pool = pool
        self.input_base = input_base
        # Local inputs may come only from under these folders, symlinks resolved.
        self.roots = [os.path.realpath(r) for r in (input_base, *input_roots) if r and not is_remote(r)]

    def check(self, index: int, row: dict[str, Any]) -> Checked:
        try:
            entry = self.catalog.pipeline(row.get("model"))
        except UnknownModel as e:
            raise RowError("unknown_model", e.message) from None
        task = row.get("task") or "image"
        if task not in TASK_FORMATS:
            raise RowError("unknown_task", f"task={task!r}; expected one of {', '.join(TASK_FORMATS)}")
        if task not in entry.tasks:
            raise RowError("unsupported_task", f"model {entry.name!r} serves {', '.join(entry.tasks)}, not {task!r}")
        # Before anything loads or renders: a blocked prompt never reaches a pipeline.
        rule = self.finisher.blocked_prompt(row.get("prompt"))
        if rule:
            raise Filtered(f"prompt_policy: {rule}")
        params = resolve_row(row, entry.defaults, self.limits, TASK_FORMATS, needs_prompt=False)
        if len(params.control_image_uris) != len(entry.controlnets):
            raise RowError("invalid_control_images", f"model {entry.name!r} takes {len(entry.controlnets)} control images "
                                                     f"(control_image_uris), got {len(params.control_image_uris)}")
        image = self._input_image(params.image_uri, "image_uri") if params.image_uri else None
        mask = self._input_image(params.mask_uri, "mask_uri", mode="L") if params.mask_uri else None
        controls = [self._input_image(u, "control_image_uris") for u in params.control_image_uris]
        return Checked(index, entry, params, image, mask, controls)

    def complete(self, checked: Checked, pipe: Any) -> Job:
        """The checks that need the pipeline's signature, then sizes and the per-item request."""
        entry, params = checked.entry, checked.params
        if takes_prompt(pipe) and (params.prompt is None or not str(params.prompt).strip()):
            raise RowError("missing_prompt", "row has no prompt")
        accepted = call_parameters(pipe)
        if not takes_prompt(pipe) and "image" in accepted and not params.image_uri and "class_labels" not in accepted:
            raise RowError("missing_input", f"model {entry.name!r} renders from an input image: the row needs image_uri")
        classes = getattr(getattr(getattr(pipe, "unet", None), "config", None), "num_class_embeds", None)
        if "class_labels" in accepted and classes:
            # Left out, class-conditional families draw labels unseeded: derive one from the seed instead.
            label = params.seed % classes if params.class_label is None else params.class_label
            if not 0 <= label < classes:
                raise RowError("invalid_class_label", f"class_label={label} must be in 0..{classes - 1} for {entry.name!r}")
            params = replace(params, class_label=label)
        width, height = params.width, params.height
        image = checked.image
        if image is not None:
            if width is None or height is None:
                width, height = edit_size(image.size, self.limits.max_pixels)
            image = image.resize((width, height)) if image.size != (width, height) else image
        elif params.task in ("image", "video") and (width is None or height is None):
            native_w, native_h = default_size(pipe)
            width, height = width or native_w, height or native_h
        if width is not None and height is not None:
            check_size(width, height, self.limits)
        size = (width, height) if width and height else None
        request = Request(
            seed=params.seed,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            image=image,
            mask_image=_resized(checked.mask, size),
            control_images=[_resized(c, size) for c in checked.controls],
            class_label=params.class_label,
        )
        if params.task in ("audio", "mesh"):
            width = height = None
        return Job(checked.index, entry, params, request, width, height)

    def adapter_refs(self, params: RowParams) -> tuple[list[Lora], list[Embedding]]:
        """The row's LoRAs and embeddings: catalog names, or paths and s3:// prefixes."""
        loras = []
        for ref, scale in params.loras:
            entry = self._adapter_entry(ref, "lora")
            name = entry.name if entry else "lora-" + id_hash(ref)[:12]
            loras.append(Lora(name, self.pool.local(entry.source) if entry else self._adapter_path(ref, "loras"), scale))
        embeddings = []
        for ref in params.embeddings:
            entry = self._adapter_entry(ref, "embedding")
            name = entry.name if entry else "emb-" + id_hash(ref)[:12]
            embeddings.append(Embedding(name, self.pool.local(entry.source) if entry else self._adapter_path(ref, "embeddings"),
                                        entry.token if entry else None))
        return loras, embeddings

    # -- inputs ------------------------------------------------------------------------------

    def _resolve_uri(self, uri: str, column: str) -> str:
        """The input's location: s3:// as given; local paths resolved (symlinks too) and kept under the roots."""
        if is_remote(uri):
            return uri
        if not os.path.isabs(uri) and self.input_base:
            try:
                uri = join(self.input_base, uri)
            except ValueError:  # '..' parts
                raise RowError("input_not_allowed", f"{column} {uri!r} climbs out of the manifest's folder") from None
            if is_remote(uri):  # relative to a manifest on S3
                return uri
        real = os.path.realpath(uri)
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots):
            raise RowError("input_not_allowed", f"{column} {uri!r} is outside the folders inputs may come from "
                                                "(the manifest's folder and --input-root)")
        return real

    def _input_image(self, uri: str, column: str, mode: str = "RGB") -> Image.Image:
        path = self._resolve_uri(uri, column)
        try:
            data = read_bytes(path, max_bytes=self.limits.max_input_bytes)
            return decode_image(data, max_pixels=self.limits.max_input_pixels, mode=mode, name=f"{column} {uri}")
        except FileNotFoundError:
            raise RowError("missing_input", f"{column} {uri} does not exist") from None
        except InputError as e:
            raise RowError("invalid_input", str(e)) from None
        except ValueError as e:  # over the byte limit, not a regular file, a malformed URI
            raise RowError("invalid_input", f"{column}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the store failed (after its own retries), not the row
            raise RowError("input_unavailable", f"{column} {uri}: {type(e).__name__}: {e}") from None

    def _adapter_entry(self, ref: str, kind: str) -> ModelEntry | None:
        try:
            return self.catalog.adapter(ref, kind)
        except UnknownModel as e:
            raise RowError(f"invalid_{kind}", e.message) from None

    def _adapter_path(self, uri: str, column: str) -> str:
        """A LoRA or embedding file or folder, local or fetched, holding safetensors weights only."""
        path = self.pool.local(uri) if is_remote(uri) else self._resolve_uri(uri, column)
        if not os.path.exists(path):
            raise FileNotFoundError(uri)
        try:
            if os.path.isdir(path):
                check_safetensors(path)
            elif not path.endswith(".safetensors"):
                raise ModelLoadError(f"{uri} is not a .safetensors file; renderfleet loads safetensors only")
        except ModelLoadError as e:
            raise RowError(f"invalid_{column.rstrip('s')}", str(e)) from None
        return path


def _resized(image: Image.Image | None, size: tuple[int, int] | None) -> Image.Image | None:
    if image is None or size is None or image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)
