"""Scheduled job specs: a YAML file naming a cron schedule, where the manifest comes from (a file, or a
product table × prompt templates × sizes × formats × models), the catalog and safety settings, and an
output prefix templated by the fire time. Schema errors name the field, so a typo fails before a fire.

Template rows get ids hashed from (product key, template, size, format, model), so a retried fire renders
into the same prefix and skips what it finished; `fire_times` is the one definition of when a spec fires.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from pipelines.media.formats import TASK_FORMATS, TASKS
from storage.fs import is_remote
from storage.manifest import MANIFEST_COLUMNS

SPEC_KEYS = {"name", "schedule", "manifest", "catalog", "safety", "output", "render", "kubernetes"}
TEMPLATE_KEYS = {"products", "key", "prompts", "negative_prompt", "sizes", "formats", "models", "task", "params"}
RENDER_KEYS = {"workers": int, "batch_size": int, "max_failed_fraction": float, "max_steps": int, "max_pixels": int}
KUBERNETES_KEYS = {"image": str, "namespace": str, "kubectl_image": str, "starting_deadline_seconds": int,
                   "successful_jobs_history_limit": int, "failed_jobs_history_limit": int}
SAFETY_ACTIONS = ("block", "blur", "flag")
TEMPLATED = ("id", "task", "model", "prompt", "negative_prompt", "width", "height", "output_format",
             "product_key", "prompt_template")  # columns a template row sets itself; `params` may not set them
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")  # DNS-1123 label, short enough for k8s job names
_SIZE = re.compile(r"(\d+)x(\d+)")


class SpecError(ValueError):
    """The spec is unusable; the message starts with the file and the field at fault."""


@dataclass(frozen=True)
class Template:
    """A product table expanded through prompt templates into manifest rows."""

    products: str  # Parquet or CSV, local path (absolute) or store URI
    key: str
    prompts: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    formats: tuple[str, ...]
    models: tuple[str, ...]
    task: str = "image"
    negative_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> set[str]:
        """Every {column} the prompt templates name."""
        texts = [*self.prompts, self.negative_prompt or ""]
        return {name for text in texts for _, name, _, _ in string.Formatter().parse(text) if name}


@dataclass(frozen=True)
class Spec:
    """One scheduled job, loaded and checked; local paths are absolute (relative ones are from the spec's folder)."""

    path: str
    name: str
    cron: str
    timezone: ZoneInfo
    output: str  # a template with {fire_time:...}
    catalog: str | None = None
    manifest_uri: str | None = None
    template: Template | None = None
    safety_action: str | None = None
    render: dict[str, Any] = field(default_factory=dict)
    kubernetes: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the spec file as written (render-k8s ships it into the cluster)

    def prefix(self, fire_time: datetime) -> str:
        """The output prefix of the fire at `fire_time` (rendered in the spec's time zone)."""
        return self.output.format(fire_time=fire_time.astimezone(self.timezone))

    def fire_times(self, after: datetime, count: int) -> list[datetime]:
        """The next `count` fire times strictly after `after`, in the spec's time zone.

        A fire is a wall-clock time in the spec's zone. In the hour a fall-back repeats, a wall-clock time fires
        once (its first instant); in the hour a spring-forward skips, croniter moves it to the first instant
        after the gap, as Vixie cron does."""
        from croniter import croniter

        times: list[datetime] = []
        it = croniter(self.cron, after.astimezone(self.timezone))
        while len(times) < count:
            t = it.get_next(datetime).astimezone(self.timezone)
            if t.replace(fold=0).utcoffset() != t.utcoffset():  # the second pass over a repeated wall-clock time
                continue
            times.append(t)
        return times

    def previous_fire(self, at: datetime) -> datetime:
        """The last fire time strictly before `at`."""
        from croniter import croniter

        return croniter(self.cron, at.astimezone(self.timezone)).get_prev(datetime).astimezone(self.timezone)


def load_spec(path: str) -> Spec:
    """Reads and checks a spec file; SpecError names the field at fault."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return parse_spec(data, os.path.dirname(os.path.abspath(path)), path, text)


def parse_spec(data: Any, base: str, where: str = "spec", text: str = "") -> Spec:
    """Checks a spec mapping field by field; relative local paths resolve against `base`."""
    err = lambda field_, msg: SpecError(f"{where}: {field_}: {msg}")  # noqa: E731
    _keys(data, SPEC_KEYS, where, "")
    for required in ("name", "schedule", "manifest", "output"):
        if required not in data:
            raise err(required, "required")
    name = data["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise err("name", f"{name!r} must be lower-case letters, digits and '-' (at most 40), for Kubernetes names")
    schedule = data["schedule"]
    _keys(schedule, {"cron", "timezone"}, where, "schedule.")
    cron = schedule.get("cron")
    if not isinstance(cron, str) or not _valid_cron(cron):
        raise err("schedule.cron", f"{cron!r} is not a 5-field cron expression (minute hour day month weekday)")
    tz_name = schedule.get("timezone", "UTC")
    try:
        tz = ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        raise err("schedule.timezone", f"{tz_name!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
    output = data["output"]
    if not isinstance(output, str) or not output:
        raise err("output", "expected a prefix such as s3://bucket/campaign/{fire_time:%Y-%m-%d}/")
    _check_output(output, err)
    manifest = data["manifest"]
    _keys(manifest, {"uri", "template"}, where, "manifest.")
    if ("uri" in manifest) == ("template" in manifest):
        raise err("manifest", "give exactly one of uri (a Parquet, CSV or JSON Lines file or folder) or template")
    manifest_uri = template = None
    if "uri" in manifest:
        manifest_uri = _path(manifest["uri"], base, err, "manifest.uri")
    else:
        template = _template(manifest["template"], base, err, where)
    catalog = _path(data["catalog"], base, err, "catalog") if data.get("catalog") is not None else None
    safety = data.get("safety") or {}
    _keys(safety, {"action"}, where, "safety.")
    action = safety.get("action")
    if action is not None and action not in SAFETY_ACTIONS:
        raise err("safety.action", f"{action!r}; expected one of {', '.join(SAFETY_ACTIONS)}")
    render = _typed(data.get("render") or {}, RENDER_KEYS, err, where, "render")
    kubernetes = _typed(data.get("kubernetes") or {}, KUBERNETES_KEYS, err, where, "kubernetes")
    spec = Spec(path=os.path.abspath(where) if os.path.exists(where) else where, name=name, cron=cron, timezone=tz,
                output=output.rstrip("/") if output.rstrip("/") else output, catalog=catalog,
                manifest_uri=manifest_uri, template=template, safety_action=action, render=render,
                kubernetes=kubernetes, text=text)
    if template is not None and catalog is not None:
        _check_models(template, catalog, err)
    return spec


def _keys(data: Any, allowed: set[str], where: str, prefix: str) -> None:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: {prefix.rstrip('.') or 'spec'}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise SpecError(f"{where}: {', '.join(prefix + k for k in unknown)}: unknown key"
                        f"{'s' if len(unknown) > 1 else ''} (allowed: {', '.join(sorted(allowed))})")


def _typed(data: Any, keys: dict[str, type], err, where: str, section: str) -> dict[str, Any]:
    _keys(data, set(keys), where, section + ".")
    for k, v in data.items():
        want = keys[k]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else \
            isinstance(v, want) and not isinstance(v, bool)
        if not ok:
            raise err(f"{section}.{k}", f"expected {want.__name__}, got {v!r}")
    return dict(data)


def _valid_cron(expr: str) -> bool:
    from croniter import croniter

    return len(expr.split()) == 5 and croniter.is_valid(expr)


def _check_output(output: str, err) -> None:
    """Only {fire_time[:strftime]} may appear in the output template, and it must format."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(output) if name is not None}
    except ValueError as e:
        raise err("output", f"bad template {output!r}: {e}") from None
    if names - {"fire_time"}:
        raise err("output", f"unknown field {{{sorted(names - {'fire_time'})[0]}}}; only {{fire_time:FORMAT}} may appear")
    try:
        output.format(fire_time=datetime(2000, 1, 2, 3, 4, tzinfo=timezone.utc))
    except (ValueError, KeyError, IndexError) as e:
        raise err("output", f"bad template {output!r}: {e}") from None


def _path(value: Any, base: str, err, field_: str) -> str:
    if not isinstance(value, str) or not value:
        raise err(field_, f"expected a path or store URI, got {value!r}")
    if is_remote(value) or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _strings(value: Any, err, field_: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise err(field_, f"expected a non-empty list, got {value!r}")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise err(f"{field_}[{i}]", f"expected a non-empty string, got {v!r}")
    return tuple(value)


def _template(data: Any, base: str, err, where: str) -> Template:
    _keys(data, TEMPLATE_KEYS, where, "manifest.template.")
    f = "manifest.template."
    for required in ("products", "key", "prompts", "sizes", "models"):
        if required not in data:
            raise err(f + required, "required")
    key = data["key"]
    if not isinstance(key, str) or not key:
        raise err(f + "key", f"expected the product table's key column, got {key!r}")
    prompts = _strings(data["prompts"], err, f + "prompts")
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise err(f + "negative_prompt", f"expected a string, got {negative!r}")
    for i, text in enumerate([*prompts, negative or ""]):
        try:
            fields = [(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(text) if n is not None]
        except ValueError as e:
            raise err(f + (f"prompts[{i}]" if i < len(prompts) else "negative_prompt"), f"bad template: {e}") from None
        for n, _, _ in fields:
            if not n or not n.isidentifier():
                raise err(f + (f"prompts[{i}]" if i < len(prompts) else "negative_prompt"),
                          f"{{{n}}} must name a product table column")
    sizes = []
    raw_sizes = data["sizes"] if isinstance(data["sizes"], list) else [data["sizes"]]
    for i, s in enumerate(raw_sizes):
        m = _SIZE.fullmatch(str(s).strip())
        if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
            raise err(f"{f}sizes[{i}]", f"{s!r} is not WIDTHxHEIGHT (e.g. 512x512)")
        sizes.append((int(m.group(1)), int(m.group(2))))
    task = data.get("task", "image")
    if task not in TASKS:
        raise err(f + "task", f"{task!r}; expected one of {', '.join(TASKS)}")
    formats = _strings(data.get("formats", [TASK_FORMATS[task][0]]), err, f + "formats")
    for i, fmt in enumerate(formats):
        if fmt not in TASK_FORMATS[task]:
            raise err(f"{f}formats[{i}]", f"{fmt!r} is not a {task} format ({', '.join(TASK_FORMATS[task])})")
    models = _strings(data["models"], err, f + "models")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise err(f + "params", f"expected a mapping of manifest columns to values, got {params!r}")
    for k, v in params.items():
        if k in TEMPLATED:
            raise err(f"{f}params.{k}", "set by the template itself")
        if k not in MANIFEST_COLUMNS:
            raise err(f"{f}params.{k}", f"not a manifest column (known: {', '.join(sorted(set(MANIFEST_COLUMNS) - set(TEMPLATED)))})")
        if isinstance(v, (dict, list)) and MANIFEST_COLUMNS[k] not in ("strings", "number_or_numbers", "loras"):
            raise err(f"{f}params.{k}", f"expected a single value, got {v!r}")
    return Template(products=_path(data["products"], base, err, f + "products"), key=key, prompts=prompts,
                    sizes=tuple(sizes), formats=formats, models=models, task=task, negative_prompt=negative,
                    params=dict(params))


def _check_models(template: Template, catalog: str, err) -> None:
    """Template models must be pipelines of the spec's catalog (checked when the catalog is readable here)."""
    from pipelines.catalog import Catalog, CatalogError

    if is_remote(catalog) or not os.path.exists(catalog):
        return  # a path inside the cluster's image: checked when the fire runs
    try:
        cat = Catalog.load(catalog)
    except CatalogError as e:
        raise err("catalog", str(e)) from None
    pipelines = sorted(n for n, m in cat.models.items() if m.kind == "pipeline")
    for i, model in enumerate(template.models):
        if model not in pipelines:
            raise err(f"manifest.template.models[{i}]", f"{model!r} is not a pipeline in {catalog} "
                                                         f"(pipelines: {', '.join(pipelines)})")


def row_id(product_key: str, prompt_template: str, size: tuple[int, int], fmt: str, model: str) -> str:
    """The stable id of one template row: the same inputs give the same id in every fire."""
    blob = json.dumps([product_key, prompt_template, f"{size[0]}x{size[1]}", fmt, model], ensure_ascii=False)
    return "t-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def parse_time(text: str, tz: ZoneInfo, now: datetime | None = None) -> datetime:
    """A fire time from the command line: `now`, ISO 8601 (without an offset: in the spec's zone), or @EPOCH."""
    text = text.strip()
    if text == "now":
        return (now or datetime.now(timezone.utc)).astimezone(tz).replace(second=0, microsecond=0)
    try:
        if text.startswith("@"):
            return datetime.fromtimestamp(float(text[1:]), timezone.utc).astimezone(tz)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give ISO 8601 (2026-03-29T06:00, 2026-03-29T04:00:00Z), "
                         "@EPOCH_SECONDS or now") from None
    return value.replace(tzinfo=tz) if value.tzinfo is None else value.astimezone(tz)


def expand_rows(template: Template, products: Iterator[list[dict[str, Any]]], where: str) -> Iterator[list[dict[str, Any]]]:
    """Manifest rows for each batch of product rows; ValueError names the product row and field a prompt lacks."""
    seen: set[str] = set()
    number = 0
    for batch in products:
        rows = []
        for product in batch:
            number += 1
            key = product.get(template.key)
            if key is None or str(key) == "":
                raise ValueError(f"{where}: row {number}: the key column {template.key!r} is empty or missing")
            key = str(key)
            if key in seen:
                raise ValueError(f"{where}: row {number}: duplicate product key {key!r} in column {template.key!r}")
            seen.add(key)
            negative = _fill(template.negative_prompt, product, where, number, key) if template.negative_prompt else None
            for text in template.prompts:
                prompt = _fill(text, product, where, number, key)
                for size in template.sizes:
                    for fmt in template.formats:
                        for model in template.models:
                            row = {"id": row_id(key, text, size, fmt, model), "task": template.task, "model": model,
                                   "prompt": prompt, "width": size[0], "height": size[1], "output_format": fmt,
                                   "product_key": key, "prompt_template": text, **template.params}
                            if negative is not None:
                                row["negative_prompt"] = negative
                            rows.append(row)
        yield rows


def _fill(text: str, product: dict[str, Any], where: str, number: int, key: str) -> str:
    values = {}
    for _, name, _, _ in string.Formatter().parse(text):
        if not name:
            continue
        if name not in product:
            raise ValueError(f"{where}: row {number} (key {key!r}): the prompt template names {{{name}}}, "
                             f"which is not a column of the product table")
        value = product[name]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{where}: row {number} (key {key!r}): field {name!r} is empty, and the prompt "
                             f"template {text!r} needs it")
        values[name] = value
    return text.format(**values)
