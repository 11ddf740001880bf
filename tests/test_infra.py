"""The deployment files parse, validate against real schemas, and point at code and versions that exist.

Core Kubernetes kinds (and every pod template inside KubeRay's) go through kubernetes-validate; KubeRay's own
kinds, which kubernetes-validate passes unchecked, through tests/kuberay_schema.json; Serve configs through
Ray Serve's schema; the AWS cluster-launcher file through Ray's launcher checks.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from packaging.requirements import Requirement

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S_VERSION = "1.37.0"
KUBERAY_FILES = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")
KUBERAY_SCHEMA = json.loads((ROOT / "tests" / "kuberay_schema.json").read_text())


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _kuberay(name: str) -> dict[str, Any]:
    return next(d for d in _docs(name) if d["apiVersion"] == "ray.io/v1")


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _builder(import_path: str):
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_every_file_parses():
    names = sorted(p.name for p in INFRA.iterdir() if p.is_file())
    assert {"Dockerfile", "constraints.txt", "cluster-aws.yaml", "serve-config.yaml", *KUBERAY_FILES} <= set(names)
    for name in names:
        if name.endswith(".yaml"):
            assert _docs(name), name
    known = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "ARG", "LABEL", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {i for i, _ in _dockerfile()} <= known


def test_core_kinds_and_every_pod_template_pass_kubernetes_validate():
    checked = 0
    for name in KUBERAY_FILES:
        for doc in _docs(name):
            if doc["apiVersion"] != "ray.io/v1":
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                checked += 1
                continue
            for template in _templates(_cluster_spec(doc)):
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
                checked += 1
    assert checked >= 7
    broken = copy.deepcopy(_templates(_cluster_spec(_kuberay("raycluster.yaml")))[1])
    broken["spec"]["containers"][0]["resource"] = {}  # a typo kubernetes-validate must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": broken}, K8S_VERSION, strict=True)


def test_kuberay_kinds_match_the_schema_of_the_fields_we_use():
    jsonschema.Draft202012Validator.check_schema(KUBERAY_SCHEMA)
    validator = jsonschema.Draft202012Validator(KUBERAY_SCHEMA)
    kinds = set()
    for name in KUBERAY_FILES:
        doc = _kuberay(name)
        validator.validate(doc)
        kinds.add(doc["kind"])
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    doc = _kuberay("raycluster.yaml")
    for path, value in ((("spec", "workerGroupSpecs", 0, "maxReplica"), 8),                # a typo
                        (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),      # not a string
                        (("spec", "authOptions", "mode"), "on")):                        # not a mode
        bad = copy.deepcopy(doc)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert not validator.is_valid(bad), path


def test_clusters_have_a_cpu_head_autoscaling_gpu_workers_a_node_cache_and_token_auth():
    for name in KUBERAY_FILES:
        spec = _cluster_spec(_kuberay(name))
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"] == {"mode": "token", "secretName": "renderfleet-ray-token"}, name
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name
        assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head["template"]["spec"]["containers"])
        (group,) = spec["workerGroupSpecs"]
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] > group["minReplicas"]
        pod = group["template"]["spec"]
        worker = next(c for c in pod["containers"] if c["name"] == "ray-worker")
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        cache = next(v for v in pod["volumes"] if v["name"] == "models")
        assert cache["hostPath"]["type"] == "DirectoryOrCreate", name  # node-local, shared by the node's pods
        assert {"name": "models", "mountPath": "/models"} in worker["volumeMounts"], name
        images = {c["image"] for t in _templates(spec) for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])}
        assert len(images) == 1 and not images.pop().endswith(":latest"), name


def test_serve_configs_match_ray_serves_schema_and_import_paths_resolve():
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load((INFRA / "serve-config.yaml").read_text())
    inner = yaml.safe_load(_kuberay("rayservice.yaml")["spec"]["serveConfigV2"])
    for config in (serve_config, inner):
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            builder = _builder(app["import_path"])
            assert callable(builder) and {"catalog", "store"} <= set(app["args"])
            with pytest.raises(ValueError, match="needs args: catalog, store"):
                builder({})
    assert inner["applications"] == serve_config["applications"]


def test_rayjob_runs_a_render_our_cli_accepts():
    from jobs.cli import parser

    spec = _kuberay("rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["renderfleet", "render"]
    args = parser().parse_args(argv[1:])
    assert args.catalog == "/config/catalog.yaml" and args.out.startswith("s3://")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0


def test_the_configmaps_catalog_loads(tmp_path):
    from pipelines.catalog import Catalog

    (config_map,) = [d for d in _docs("raycluster.yaml") if d["kind"] == "ConfigMap"]
    path = tmp_path / "catalog.yaml"
    path.write_text(config_map["data"]["catalog.yaml"])
    assert Catalog.load(str(path)).default_model == "sd15"


def test_aws_cluster_launcher_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before it calls AWS
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu)
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command and "ray start" in command
    assert any(target.endswith("/.ray/auth_token") for target in config["file_mounts"])
    assert config["docker"]["image"] == _kuberay("raycluster.yaml")["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]


def test_dockerfile_is_cuda_based_installs_the_project_and_pins_every_dependency():
    instructions = _dockerfile()
    base = next(a for i, a in instructions if i == "FROM")
    image, _, tag = base.partition(":")
    assert image == "rayproject/ray" and tag.startswith(f"{ray.__version__}-py311-cu"), base  # Ray's CUDA images
    for instruction, args in instructions:
        if instruction == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            assert all((ROOT / s).exists() for s in sources), args
        if instruction == "RUN" and "pip install" in args:
            assert "-c constraints.txt" in args, args
    assert any(i == "RUN" and "renderfleet --version" in a for i, a in instructions)
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not pinned in infra/constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {req.specifier}"
    assert pins["ray"] == ray.__version__
