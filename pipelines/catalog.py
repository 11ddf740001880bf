"""The model catalog: a YAML file naming every model a job or endpoint may use.

Schema (unknown keys are errors that name them):

    default_model: NAME            # optional; else the first pipeline
    safety:                        # applied by renderfleet to every output, batch and online
      prompt_policy: FILE          # YAML {terms: [...], patterns: [...]}, relative to this file
      checker: NAME                # a kind: safety_checker entry
      action: block | blur | flag  # what a flagged output becomes (a job may override it)
      frame_stride: 8              # video: check every k-th frame, always the first and last
      watermark: true
      watermark_method: dwtDctSvd  # or dwtDct
      watermark_message: 12 hex digits (48 bits; default renderfleet's own)
      include_prompt: false        # provenance metadata carries the prompt, else its sha256
      c2pa_cert_chain: FILE        # with c2pa_private_key: sign images and videos (C2PA)
      c2pa_private_key: FILE
    models:
      NAME:
        kind: pipeline | controlnet | lora | embedding | safety_checker
        source: DIR | ORG/REPO | s3://bucket/prefix   # relative DIRs are relative to this file
        revision: REV              # Hub sources only
        tasks: [image, edit, video, mesh, audio]      # pipelines only: what rows it serves
        pipeline_class: CLASS      # a diffusers class built over the same components (from_pipe)
        stages: [NAME, ...]        # cascades: later pipeline entries, each fed the previous output
        controlnets: [NAME, ...]   # controlnet entries handed to pipeline_class
        token: "<token>"           # embeddings: the prompt token it defines
        license: TEXT              # optional: the weights' licence (e.g. openrail++), for dataset cards
        dtype: auto | float32 | float16 | bfloat16
        defaults: {num_inference_steps: 30, ...}      # call parameters under the row's own
        policy: {...}              # memory and speed, below; a job overrides keys with --policy KEY=VALUE
        serve: {min_replicas, max_replicas, target_ongoing_requests, max_batch_size, batch_wait_timeout_s,
                max_ongoing_requests, max_queued_requests, upscale_delay_s, downscale_delay_s, num_gpus,
                num_cpus, resources, enabled, quality, styles}
            # min_replicas: 1 for the default model, else 0 (scale from zero); enabled: served without --models;
            # quality: {standard: 20, hd: 50, ...} request quality -> steps; styles: {vivid: "text appended to the prompt"}
            # resources: {accelerator_a100: 1, ...} custom Ray resources each replica asks for (positive amounts)

Policy keys (all optional; applied once, when an actor places the model):

    offload: none | model | sequential | group | auto   # on CPU-only actors offloading is skipped (warned)
        model: one component at a time on the device; sequential: one leaf module at a time (least memory,
        slowest); group: diffusers' group-offload hooks, `group_blocks` blocks at a time, prefetched on a
        CUDA stream where there is one; auto: none if the whole model fits the actor's free memory (the
        smaller of the device's free bytes and the actor's budget, which follows its GPU share), else
        model if the largest component fits, else group.
    group_blocks: 1                # group offload: blocks per group; 0 = leaf level (one layer at a time)
    attention_slicing: false       # replaces SDPA with sliced attention: less memory, slower
    vae_slicing: false             # decode a batch one image at a time
    vae_tiling: false              # decode large images in overlapping tiles
    ff_chunking: false             # transformer feed-forwards one sample at a time (where the denoiser has them)
    channels_last: false           # denoiser and VAE in channels-last memory format (faster convs on GPUs)
    compile: none | regional | full  # torch.compile the denoiser: regional compiles its repeated blocks once
        (where diffusers marks them), else the whole denoiser; compile time is reported apart from render time
    compile_mode: default          # torch.compile mode (default, reduce-overhead, max-autotune, ...)
    compile_backend: inductor      # torch.compile backend

Attention stays on PyTorch's scaled-dot-product attention (diffusers' default) unless slicing is asked for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipelines.media.formats import TASKS
from pipelines.settings import CatalogError, check_keys, typed_settings

KINDS = ("pipeline", "controlnet", "lora", "embedding", "safety_checker")
SIZED = ("CPU", "GPU", "memory", "object_store_memory")  # not custom resources: serve.num_cpus/num_gpus size a replica
SAFETY_ACTIONS = ("block", "blur", "flag")
DTYPES = ("auto", "float32", "float16", "bfloat16")
OFFLOADS = ("none", "model", "sequential", "group", "auto")
COMPILES = ("none", "regional", "full")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


class UnknownModel(KeyError):
    """A row or request names a model the catalog does not have."""

    def __init__(self, name: str, known: list[str], kind: str | None = None):
        super().__init__(name)
        what = f"model {name!r} is a {kind}, not usable here" if kind else f"unknown model {name!r}"
        self.message = f"{what}; catalog has: {', '.join(known) or 'none'}"

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Policy:
    """Memory and speed settings applied after loading."""

    offload: str = "none"
    group_blocks: int = 1
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    ff_chunking: bool = False
    channels_last: bool = False
    compile: str = "none"
    compile_mode: str = "default"
    compile_backend: str = "inductor"

    def overridden(self, overrides: dict[str, Any], where: str = "policy") -> Policy:
        """This policy with a job's KEY=VALUE overrides (strings from the command line, or typed values)."""
        defaults = Policy()
        values = {}
        for key, value in overrides.items():
            if key not in self.__dataclass_fields__:
                raise CatalogError(f"{where}: unknown policy key {key!r} (allowed: {', '.join(self.__dataclass_fields__)})")
            values[key] = _coerce(value, type(getattr(defaults, key)), f"{where}.{key}")
        return check_policy(replace(self, **values), where)


def _coerce(value: Any, want: type, where: str) -> Any:
    """A command-line string as the policy field's type (bools: true/false/1/0/yes/no/on/off)."""
    if not isinstance(value, str) or want is str:
        return value
    text = value.strip().lower()
    if want is bool and text in _TRUE + _FALSE:
        return text in _TRUE
    if want is int and re.fullmatch(r"-?\d+", text):
        return int(text)
    raise CatalogError(f"{where}: expected {want.__name__}, got {value!r}")


def check_policy(policy: Policy, where: str) -> Policy:
    """Refuses values the policy fields do not take; returns the policy."""
    for key, choices in (("offload", OFFLOADS), ("compile", COMPILES)):
        if getattr(policy, key) not in choices:
            raise CatalogError(f"{where}.{key}: {getattr(policy, key)!r}; expected one of {', '.join(choices)}")
    for key in policy.__dataclass_fields__:
        want = type(getattr(Policy(), key))
        value = getattr(policy, key)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise CatalogError(f"{where}.{key}: expected {want.__name__}, got {value!r}")
    if policy.group_blocks < 0:
        raise CatalogError(f"{where}.group_blocks: {policy.group_blocks} is negative (0 means leaf level)")
    return policy


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` strings (the CLI's repeatable --policy) as a mapping; checked against Policy when applied."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CatalogError(f"--policy {item!r}: expected KEY=VALUE, e.g. offload=group or compile=regional")
        pairs[key.strip()] = value.strip()
    Policy().overridden(pairs, "--policy")  # unknown keys and bad values fail before the job starts
    return pairs


@dataclass(frozen=True)
class ServeSettings:
    """Online settings for the model's Serve deployment."""

    min_replicas: int = 0  # the default model's default is 1 (Catalog.from_dict): warm at start, others scale from zero
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int = 8
    max_queued_requests: int = 32
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    num_gpus: float = 1.0  # per replica on GPU clusters (fractions share a GPU)
    num_cpus: float = 0.0  # CPUs per replica (0: the server's --replica-cpus)
    resources: dict = field(default_factory=dict)  # custom Ray resources per replica (accelerator_a100: 1)
    enabled: bool = False  # served by `renderfleet serve` without --models (the default model always is)
    quality: dict = field(default_factory=dict)  # OpenAI `quality` value -> num_inference_steps; others get a 400
    styles: dict = field(default_factory=dict)  # OpenAI `style` value -> text appended to the prompt; others a 400


@dataclass(frozen=True)
class SafetySettings:
    """Renderfleet's own safety, watermark and provenance steps (paths already resolved)."""

    prompt_policy: str = ""
    checker: str = ""
    action: str = "block"
    frame_stride: int = 8
    watermark: bool = True
    watermark_method: str = "dwtDctSvd"
    watermark_message: str = ""
    include_prompt: bool = False
    c2pa_cert_chain: str = ""
    c2pa_private_key: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """One catalog model, its source resolved against the catalog's directory."""

    name: str
    kind: str
    source: str
    tasks: tuple[str, ...]
    revision: str | None = None
    pipeline_class: str | None = None
    dtype: str = "auto"
    defaults: dict[str, Any] = field(default_factory=dict)
    policy: Policy = Policy()
    serve: ServeSettings = ServeSettings()
    stages: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    token: str | None = None
    license: str | None = None  # the weights' licence, shown in exported datasets' cards


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelEntry]
    default_model: str
    path: str | None = None
    safety: SafetySettings = SafetySettings()

    def get(self, name: str | None) -> ModelEntry:
        """The entry for `name` (the default model when None)."""
        key = self.default_model if name is None else name
        if key not in self.models:
            raise UnknownModel(key, sorted(self.models))
        return self.models[key]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalog:
        path = Path(path).expanduser().resolve()
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError as e:
            raise CatalogError(f"catalog not found: {path}") from e
        except yaml.YAMLError as e:
            raise CatalogError(f"catalog {path} is not valid YAML: {e}") from e
        return cls.from_dict(data, base_dir=path.parent, path=str(path))

    @classmethod
    def from_dict(cls, data: Any, base_dir: Path, path: str | None = None) -> Catalog:
        where = path or "catalog"
        check_keys(data, {"default_model", "models", "safety"}, where)
        models_raw = data.get("models")
        if not isinstance(models_raw, dict) or not models_raw:
            raise CatalogError(f"{where}: 'models' must be a non-empty mapping")
        models = {str(n): _entry(str(n), spec, base_dir, f"{where}: models.{n}") for n, spec in models_raw.items()}
        for m in models.values():
            for ref, kind in [(r, "pipeline") for r in m.stages] + [(r, "controlnet") for r in m.controlnets]:
                if ref not in models or models[ref].kind != kind:
                    raise CatalogError(f"{where}: models.{m.name} names {ref!r}, which is not a {kind} entry of this catalog")
        pipelines = [n for n, m in models.items() if m.kind == "pipeline"]
        if not pipelines:
            raise CatalogError(f"{where}: no model of kind pipeline")
        default = data.get("default_model") or pipelines[0]
        if default not in pipelines:
            raise CatalogError(f"{where}: default_model {default!r} is not a pipeline in models")
        if "min_replicas" not in (models_raw[default].get("serve") or {}):  # the default model starts warm
            models[default] = replace(models[default], serve=replace(models[default].serve, min_replicas=1))
        safety = typed_settings(SafetySettings, data.get("safety"), f"{where}: safety")
        if safety.action not in SAFETY_ACTIONS:
            raise CatalogError(f"{where}: safety.action {safety.action!r}; expected one of {', '.join(SAFETY_ACTIONS)}")
        if safety.checker and (safety.checker not in models or models[safety.checker].kind != "safety_checker"):
            raise CatalogError(f"{where}: safety.checker {safety.checker!r} is not a safety_checker entry of this catalog")
        if bool(safety.c2pa_cert_chain) != bool(safety.c2pa_private_key):
            raise CatalogError(f"{where}: safety.c2pa_cert_chain and safety.c2pa_private_key go together")
        paths = {k: str((base_dir / getattr(safety, k)).resolve()) for k in ("prompt_policy", "c2pa_cert_chain", "c2pa_private_key")
                 if getattr(safety, k)}
        return cls(models=models, default_model=default, path=path, safety=replace(safety, **paths))

    def pipeline(self, name: str | None) -> ModelEntry:
        """Like get, but only pipelines can render rows."""
        entry = self.get(name)
        if entry.kind != "pipeline":
            raise UnknownModel(entry.name, [n for n, m in self.models.items() if m.kind == "pipeline"], entry.kind)
        return entry

    def adapter(self, ref: str, kind: str) -> ModelEntry | None:
        """The catalog entry a row's LoRA or embedding reference names, or None for a URI."""
        entry = self.models.get(ref)
        if entry is not None and entry.kind != kind:
            raise UnknownModel(ref, [n for n, m in self.models.items() if m.kind == kind], entry.kind)
        return entry


def _entry(name: str, spec: Any, base_dir: Path, where: str) -> ModelEntry:
    check_keys(spec, set(ModelEntry.__dataclass_fields__) - {"name"}, where)
    kind = spec.get("kind", "pipeline")
    if kind not in KINDS:
        raise CatalogError(f"{where}.kind: {kind!r} is not supported (supported: {', '.join(KINDS)})")
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise CatalogError(f"{where}.source: required (a local dir, a Hub repo id or s3://bucket/prefix)")
    source = resolve_source(source, base_dir, where)
    revision = spec.get("revision")
    if revision is not None and (source.startswith("s3://") or os.path.isabs(source)):
        raise CatalogError(f"{where}.revision: only Hub sources take a revision")
    tasks = spec.get("tasks", ["image"] if kind == "pipeline" else [])
    if kind == "pipeline" and (not isinstance(tasks, list) or not tasks or any(t not in TASKS for t in tasks)):
        raise CatalogError(f"{where}.tasks: expected a non-empty list of {', '.join(TASKS)}, got {tasks!r}")
    if kind != "pipeline" and tasks:
        raise CatalogError(f"{where}.tasks: only pipelines serve tasks, not a {kind}")
    for key in ("stages", "controlnets"):
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (value and kind != "pipeline"):
            raise CatalogError(f"{where}.{key}: expected a list of catalog names on a pipeline, got {value!r}")
    token = spec.get("token")
    if (kind == "embedding") != isinstance(token, str):
        raise CatalogError(f"{where}.token: embeddings need a token string; other kinds take none")
    license_ = spec.get("license")
    if license_ is not None and (not isinstance(license_, str) or not license_.strip()):
        raise CatalogError(f"{where}.license: expected a licence name or URL, got {license_!r}")
    dtype = spec.get("dtype", "auto")
    if dtype not in DTYPES:
        raise CatalogError(f"{where}.dtype: {dtype!r}; expected one of {', '.join(DTYPES)}")
    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, dict) or any(isinstance(v, (dict, list)) for v in defaults.values()):
        raise CatalogError(f"{where}.defaults: expected a mapping of parameter names to scalar values")
    policy = check_policy(typed_settings(Policy, spec.get("policy"), f"{where}.policy"), f"{where}.policy")
    pipeline_class = spec.get("pipeline_class")
    if pipeline_class is not None and not re.fullmatch(r"[A-Za-z_]\w*", str(pipeline_class)):
        raise CatalogError(f"{where}.pipeline_class: {pipeline_class!r} is not a class name")
    return ModelEntry(
        name=name,
        kind=kind,
        source=source,
        tasks=tuple(tasks),
        revision=revision,
        pipeline_class=pipeline_class,
        dtype=dtype,
        defaults=dict(defaults),
        policy=policy,
        serve=_serve_settings(spec.get("serve"), f"{where}.serve"),
        stages=tuple(spec.get("stages", [])),
        controlnets=tuple(spec.get("controlnets", [])),
        token=token,
        license=license_,
    )


def _serve_settings(data: Any, where: str) -> ServeSettings:
    """The `serve:` section, with its quality (name -> steps), style (name -> prompt text) and resources (custom
    Ray resource -> amount per replica) maps checked."""
    settings = typed_settings(ServeSettings, data, where)
    for name, steps in settings.quality.items():
        if not isinstance(name, str) or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise CatalogError(f"{where}.quality.{name}: expected a step count (a positive int), got {steps!r}")
    for name, text in settings.styles.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise CatalogError(f"{where}.styles.{name}: expected text appended to the prompt, got {text!r}")
    for name, amount in settings.resources.items():
        if not isinstance(name, str) or not name or name in SIZED:
            raise CatalogError(f"{where}.resources.{name}: expected a custom resource name ({', '.join(SIZED)} are not: "
                               "num_cpus and num_gpus size a replica)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < float("inf"):
            raise CatalogError(f"{where}.resources.{name}: expected a positive amount, got {amount!r}")
    if settings.min_replicas < 0 or settings.max_replicas < max(1, settings.min_replicas):
        raise CatalogError(f"{where}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
    return settings


def resolve_source(source: str, base_dir: Path, where: str) -> str:
    """Local paths become absolute; Hub ids and s3:// URIs pass through."""
    if source.startswith("s3://"):
        return source
    candidate = (base_dir / Path(source).expanduser()).resolve()
    if candidate.exists() or source.startswith((".", "/", "~")):
        return str(candidate)
    if _HUB_ID.fullmatch(source):
        return source
    raise CatalogError(f"{where}.source: {source!r} is neither an existing local directory nor a Hub repo id (org/name)")


def renderfleet_home() -> Path:
    """Where renderfleet keeps its caches ($RENDERFLEET_HOME, default ~/.cache/renderfleet)."""
    return Path(os.environ.get("RENDERFLEET_HOME") or Path.home() / ".cache" / "renderfleet").expanduser()
