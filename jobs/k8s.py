"""The Kubernetes manifests that run a job spec on KubeRay: a CronJob whose pod creates one RayJob per fire.

Why a CronJob and not KubeRay's RayCronJob: RayCronJob is alpha (KubeRay >= 1.6, behind a feature gate that
is off by default), and its job template is static, so it cannot hand a RayJob the time it was scheduled
for. Kubernetes' CronJob is stable, stamps each Job with `batch.kubernetes.io/cronjob-scheduled-timestamp`
(GA since 1.32) and names it `<cronjob>-<scheduled minutes since the epoch>`; the pod reads that time and
passes it to `renderfleet schedule run --at`, so a late or retried start renders the date it was due for.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from jobs.specs import Spec

RAYJOB_BASE = Path(__file__).resolve().parent.parent / "infra" / "rayjob.yaml"
DEFAULT_IMAGE = "ghcr.io/example/renderfleet:latest"
KUBECTL_IMAGE = "bitnami/kubectl:1.33"  # any image with sh, sed and kubectl
SPEC_DIR = "/config/spec"
FIRE, NAME = "__FIRE_TIME__", "__RAYJOB_NAME__"  # filled in by the CronJob's pod for each fire

# The pod of each fire: the scheduled time from its Job (annotation, else the Job name's minute suffix), one
# RayJob per fire named after the Job (a retried pod finds it already there), then it waits for the RayJob,
# so that the CronJob's concurrencyPolicy Forbid covers the render itself.
LAUNCH = f"""set -eu
FIRE=$(kubectl get job "$JOB_NAME" -o jsonpath='{{.metadata.annotations.batch\\.kubernetes\\.io/cronjob-scheduled-timestamp}}' || true)
if [ -z "$FIRE" ]; then FIRE="@$(( ${{JOB_NAME##*-}} * 60 ))"; fi
echo "fire time: $FIRE"
sed -e "s|{FIRE}|$FIRE|g" -e "s|{NAME}|$JOB_NAME|g" /template/rayjob.yaml > /tmp/rayjob.yaml
kubectl create -f /tmp/rayjob.yaml || kubectl get rayjob "$JOB_NAME"
while :; do
  STATUS=$(kubectl get rayjob "$JOB_NAME" -o jsonpath='{{.status.jobStatus}}/{{.status.jobDeploymentStatus}}')
  case "$STATUS" in
    SUCCEEDED/*) exit 0 ;;
    FAILED/*|STOPPED/*|*/Failed) echo "RayJob $JOB_NAME: $STATUS"; exit 1 ;;
  esac
  sleep 30
done
"""


def _base_rayjob() -> dict[str, Any]:
    if RAYJOB_BASE.exists():
        return yaml.safe_load(RAYJOB_BASE.read_text())
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {}, "spec": {"rayClusterSpec": {
        "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head", "image": DEFAULT_IMAGE}]}}},
        "workerGroupSpecs": []}}}


def rayjob(spec: Spec, image: str, config_map: str) -> dict[str, Any]:
    """The RayJob of one fire, with the fire time and name as placeholders; every Ray pod mounts the spec."""
    job = copy.deepcopy(_base_rayjob())
    job["metadata"] = {"name": NAME, "labels": {"app.kubernetes.io/name": "renderfleet", "renderfleet/spec": spec.name}}
    job["spec"]["entrypoint"] = f"renderfleet schedule run {SPEC_DIR}/spec.yaml --at {FIRE}"
    job["spec"]["shutdownAfterJobFinishes"] = True
    job["spec"]["ttlSecondsAfterFinished"] = 3600
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        pod.setdefault("volumes", []).append({"name": "renderfleet-spec", "configMap": {"name": config_map}})
        for container in pod["containers"]:
            container["image"] = image
            container.setdefault("volumeMounts", []).append({"name": "renderfleet-spec", "mountPath": SPEC_DIR,
                                                             "readOnly": True})
    return job


def _spec_files(spec: Spec) -> dict[str, str]:
    """The spec as written, plus its catalog when the spec names it as a file beside itself."""
    files = {"spec.yaml": spec.text}
    raw = (yaml.safe_load(spec.text) or {}).get("catalog") if spec.text else None
    if isinstance(raw, str) and os.path.basename(raw) == raw and spec.catalog and os.path.isfile(spec.catalog):
        files[raw] = Path(spec.catalog).read_text()
    return files


def manifests(spec: Spec, image: str | None = None) -> list[dict[str, Any]]:
    """ConfigMaps (spec, RayJob template), RBAC for the launcher pod, and the CronJob."""
    k = spec.kubernetes
    image = image or k.get("image") or _base_image()
    ns = k.get("namespace", "default")
    name = spec.name
    meta = lambda n: {"name": n, "namespace": ns, "labels": {"app.kubernetes.io/name": "renderfleet",  # noqa: E731
                                                             "renderfleet/spec": name}}
    spec_cm, template_cm, account = f"{name}-spec", f"{name}-rayjob", f"{name}-launcher"
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(spec_cm), "data": _spec_files(spec)},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(template_cm),
         "data": {"rayjob.yaml": yaml.safe_dump(rayjob(spec, image, spec_cm), sort_keys=False)}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(account)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(account), "rules": [
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
            {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(account),
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta(name), "spec": {
            "schedule": spec.cron,
            "timeZone": spec.timezone.key,
            "concurrencyPolicy": "Forbid",  # a fire still rendering holds the next one back
            "startingDeadlineSeconds": k.get("starting_deadline_seconds", 3600),
            "successfulJobsHistoryLimit": k.get("successful_jobs_history_limit", 3),
            "failedJobsHistoryLimit": k.get("failed_jobs_history_limit", 5),
            "jobTemplate": {"spec": {"backoffLimit": 3, "template": {"spec": {
                "serviceAccountName": account,
                "restartPolicy": "Never",
                "containers": [{
                    "name": "launch",
                    "image": k.get("kubectl_image", KUBECTL_IMAGE),
                    "command": ["/bin/sh", "-c", LAUNCH],
                    "env": [{"name": "JOB_NAME", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}}],
                    "volumeMounts": [{"name": "template", "mountPath": "/template", "readOnly": True}],
                }],
                "volumes": [{"name": "template", "configMap": {"name": template_cm}}],
            }}}},
        }},
    ]


def _base_image() -> str:
    containers = _base_rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return containers[0].get("image") or DEFAULT_IMAGE


def render_k8s(spec: Spec, image: str | None = None) -> str:
    """The manifests as one multi-document YAML file, for `kubectl apply -f`."""
    header = (f"# renderfleet schedule render-k8s {spec.name}: a CronJob ({spec.cron}, {spec.timezone.key}) whose pod\n"
              "# creates one KubeRay RayJob per fire, passing the scheduled time to `renderfleet schedule run --at`.\n")
    return header + yaml.safe_dump_all(manifests(spec, image), sort_keys=False)
