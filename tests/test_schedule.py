"""Scheduled job specs: schema errors, fire times across DST, template expansion, one render per fire
time, and the Kubernetes manifests, validated offline."""

from __future__ import annotations

import re
import shlex
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main, parser
from jobs.schedule import fire_job
from jobs.specs import SpecError, load_spec, parse_spec, parse_time

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
BERLIN = ZoneInfo("Europe/Berlin")


def write_spec(tmp_path: Path, catalog: str, **overrides) -> Path:
    (tmp_path / "products.csv").write_text("sku,name,color\n0042,mug,red\nA.1,shoe,blue\n")
    spec = {
        "name": "shots",
        "schedule": {"cron": "0 6 * * *", "timezone": "Europe/Berlin"},
        "manifest": {"template": {"products": "products.csv", "key": "sku", "prompts": ["a {color} {name}"],
                                  "sizes": ["64x64"], "formats": ["png"], "models": ["tiny-sd"],
                                  "params": {"num_inference_steps": 2}}},
        "catalog": catalog,
        "output": str(tmp_path / "out" / "{fire_time:%Y-%m-%d}"),
        "render": {"workers": 1, "batch_size": 2},
        **overrides,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_example_specs_load():
    specs = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))
    assert len(specs) >= 2
    for path in specs:
        spec = load_spec(str(path))
        assert spec.fire_times(datetime(2026, 1, 1, tzinfo=BERLIN), 2)


@pytest.mark.parametrize("change, field", [
    ({"schedule": {"cron": "0 6 * *", "timezone": "UTC"}}, "schedule.cron"),
    ({"schedule": {"cron": "0 6 * * *", "timezone": "Mars/Base"}}, "schedule.timezone"),
    ({"output": "s3://b/{when}/"}, "output"),
    ({"manifest": {"uri": "a.csv", "template": {}}}, "manifest"),
    ({"manifest": {"template": {"products": "p.csv", "key": "sku", "prompts": ["x"], "sizes": ["64"], "models": ["m"]}}},
     "manifest.template.sizes[0]"),
    ({"manifest": {"template": {"products": "p.csv", "key": "sku", "prompts": ["x"], "sizes": ["64x64"],
                                "models": ["m"], "formats": ["mp4"]}}}, "manifest.template.formats[0]"),
    ({"manifest": {"template": {"products": "p.csv", "key": "sku", "prompts": ["x"], "sizes": ["64x64"],
                                "models": ["m"], "params": {"width": 8}}}}, "manifest.template.params.width"),
    ({"safety": {"action": "shrug"}}, "safety.action"),
    ({"render": {"workers": "two"}}, "render.workers"),
    ({"colour": 1}, "colour"),
])
def test_schema_errors_name_the_field(tmp_path, change, field):
    data = {"name": "x", "schedule": {"cron": "0 6 * * *"}, "manifest": {"uri": "m.parquet"}, "output": "o/{fire_time:%Y}"}
    data.update(change)
    with pytest.raises(SpecError, match=re.escape(f"spec: {field}:")):
        parse_spec(data, str(tmp_path))


def test_unknown_model_is_named(tmp_path, tiny_catalog):
    path = write_spec(tmp_path, tiny_catalog)
    data = yaml.safe_load(path.read_text())
    data["manifest"]["template"]["models"] = ["tiny-sd", "nope"]
    with pytest.raises(SpecError, match=r"manifest.template.models\[1\]: 'nope'"):
        parse_spec(data, str(tmp_path))


def fires(capsys, spec: Path, after: str, n: int) -> list[str]:
    assert main(["schedule", "next", str(spec), "-n", str(n), "--after", after]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()]


def test_next_matches_hand_written_fire_times_across_dst(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    base = {"name": "dst", "manifest": {"uri": "m.parquet"}, "output": "o/{fire_time:%Y-%m-%dT%H%M}"}
    # Daily 02:30 in Berlin across the spring-forward night (02:00 -> 03:00 on 2026-03-29): the skipped time
    # fires at the first instant after the gap, then 02:30 again, now at +02:00.
    spec.write_text(yaml.safe_dump({**base, "schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}}))
    assert fires(capsys, spec, "2026-03-27T12:00", 4) == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00"]
    # ... and across the fall-back night (03:00 -> 02:00 on 2026-10-25): 02:30 fires once, not twice.
    assert fires(capsys, spec, "2026-10-23T12:00", 3) == [
        "2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    # Hourly: every wall-clock hour once; the repeated 02:00 does not fire a second time.
    spec.write_text(yaml.safe_dump({**base, "schedule": {"cron": "0 * * * *", "timezone": "Europe/Berlin"}}))
    assert fires(capsys, spec, "2026-10-25T00:30+02:00", 3) == [
        "2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00"]
    assert fires(capsys, spec, "2026-03-29T00:30", 3) == [
        "2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]
    # The prefix follows the fire time in the spec's zone, whatever zone --at was given in.
    assert main(["schedule", "next", str(spec), "-n", "1", "--after", "2026-10-24T23:30:00Z"]) == 0
    assert capsys.readouterr().out.split() == ["2026-10-25T02:00:00+02:00", "o/2026-10-25T0200"]


def test_times_from_the_command_line():
    assert parse_time("2026-03-29T06:00", BERLIN).isoformat() == "2026-03-29T06:00:00+02:00"
    assert parse_time("2026-03-29T04:00:00Z", BERLIN).isoformat() == "2026-03-29T06:00:00+02:00"
    assert parse_time("@1774756800", BERLIN).isoformat() == "2026-03-29T06:00:00+02:00"
    with pytest.raises(ValueError, match="not a time"):
        parse_time("tomorrow", BERLIN)


def test_expand_writes_the_manifest_with_counts_and_stable_ids(tmp_path, tiny_catalog, capsys):
    path = write_spec(tmp_path, tiny_catalog)
    data = yaml.safe_load(path.read_text())
    data["manifest"]["template"].update(sizes=["64x64", "128x64"], models=["tiny-sd", "tiny-sdxl"])
    path.write_text(yaml.safe_dump(data))
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["schedule", "expand", str(path), "--at", "2026-03-29T06:00", "--manifest", str(first)]) == 0
    out = capsys.readouterr().out
    assert "8 rows" in out and "tiny-sd: 4 rows" in out and "tiny-sdxl: 4 rows" in out and "estimate:" in out
    assert main(["schedule", "expand", str(path), "--at", "2026-04-02T06:00", "--manifest", str(second)]) == 0
    a, b = pq.read_table(first), pq.read_table(second)
    assert a.equals(b)  # the rows do not depend on the fire time: only the output prefix does
    rows = a.to_pylist()
    assert len({r["id"] for r in rows}) == 8
    assert {r["product_key"] for r in rows} == {"0042", "A.1"}  # a key of digits stays text
    assert {r["prompt"] for r in rows} == {"a red mug", "a blue shoe"}
    assert a.schema.field("width").type == "int64" and a.schema.field("prompt").type == "string"


def test_missing_template_field_names_row_and_field(tmp_path, tiny_catalog, capsys):
    path = write_spec(tmp_path, tiny_catalog)
    (tmp_path / "products.csv").write_text("sku,name,color\n1,mug,red\n2,shoe,\n")
    assert main(["schedule", "expand", str(path), "--at", "2026-03-29T06:00", "--manifest", str(tmp_path / "m.parquet")]) == 2
    err = capsys.readouterr().err
    assert "row 2 (key '2')" in err and "'color'" in err
    data = yaml.safe_load(path.read_text())
    data["manifest"]["template"]["prompts"] = ["a {size} {name}"]
    path.write_text(yaml.safe_dump(data))
    assert main(["schedule", "expand", str(path), "--manifest", str(tmp_path / "m.parquet")]) == 2
    assert "row 1 (key '1')" in capsys.readouterr().err


def test_a_fire_renders_once_and_another_fire_time_renders_into_its_own_prefix(tmp_path, tiny_catalog, ray_cluster):
    from jobs.render import run

    spec = load_spec(str(write_spec(tmp_path, tiny_catalog)))
    at = parse_time("2026-03-29T06:00", spec.timezone)
    first = run(fire_job(spec, at, ray_cluster))
    assert first.counts == {"ok": 2}
    late = parse_time("2026-03-29T09:41", spec.timezone)  # a late or retried start of the same day's fire
    again = run(fire_job(spec, late, ray_cluster))
    assert again.skipped == 2 and again.counts == {}
    assert (tmp_path / "out" / "2026-03-29" / "results").is_dir()
    other = run(fire_job(spec, parse_time("2026-03-30T06:00", spec.timezone), ray_cluster))
    assert other.counts == {"ok": 2} and other.out.endswith("2026-03-30")


def test_render_k8s_output_validates(tmp_path, tiny_catalog, capsys):
    import kubernetes_validate

    spec = load_spec(str(ROOT / "jobs" / "specs" / "campaign.yaml"))
    target = tmp_path / "k8s.yaml"
    assert main(["schedule", "render-k8s", str(ROOT / "jobs" / "specs" / "campaign.yaml"), "--out", str(target)]) == 0
    docs = list(yaml.safe_load_all(target.read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob"}
    for doc in docs:  # core kinds against Kubernetes' own schemas, strictly (unknown fields fail)
        kubernetes_validate.validate(doc, "1.37", strict=True)
    cron = kinds["CronJob"]["spec"]
    assert cron["schedule"] == spec.cron and cron["timeZone"] == "Europe/Berlin"
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["command"][-1]
    assert "cronjob-scheduled-timestamp" in script and "--at" not in script  # the time travels in the RayJob
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert yaml.safe_load(next(c for c in configmaps if "spec.yaml" in c["data"])["data"]["spec.yaml"])["name"] == spec.name
    rayjob_text = next(c for c in configmaps if "rayjob.yaml" in c["data"])["data"]["rayjob.yaml"]
    # The RayJob the pod creates for a fire: placeholders filled as its sed does; its entrypoint is our own CLI.
    rayjob = yaml.safe_load(rayjob_text.replace("__FIRE_TIME__", "2026-03-29T04:00:00Z")
                            .replace("__RAYJOB_NAME__", "product-shots-29580480"))
    base = yaml.safe_load((ROOT / "infra" / "rayjob.yaml").read_text())
    assert rayjob["apiVersion"] == base["apiVersion"] and rayjob["kind"] == "RayJob"
    assert set(rayjob["spec"]) >= set(base["spec"])
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["renderfleet", "schedule", "run"]
    args = parser().parse_args(argv[1:])
    assert args.at == "2026-03-29T04:00:00Z" and args.spec == "/config/spec/spec.yaml"
    assert parse_time(args.at, spec.timezone).date().isoformat() == "2026-03-29"
    for group in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"], *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "renderfleet-spec", "mountPath": "/config/spec", "readOnly": True} in mounts
