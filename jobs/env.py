"""`renderfleet env`: the versions and devices a bug report needs, gathered without failing on a missing piece."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("renderfleet", "torch", "diffusers", "transformers", "ray", "pyarrow", "safetensors", "peft")


def package_version(name: str) -> str:
    """The installed distribution's version, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices() -> dict[str, Any]:
    """CUDA/MPS availability as torch sees it (imported here only: it is slow to import)."""
    try:
        import torch
    except ImportError as e:
        return {"torch": f"cannot import: {e}"}
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda}
    if info["cuda_available"]:
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps and mps.is_available())
    info["torch_threads"] = torch.get_num_threads()
    return info


def catalog_in_use(catalog: str | None) -> dict[str, Any]:
    """The catalog a job would load: --catalog, else the tiny one (not built here; says whether it exists)."""
    from pipelines.catalog import renderfleet_home

    path = catalog or str(renderfleet_home() / "tiny-models" / "catalog.yaml")
    return {"catalog": os.path.abspath(path), "catalog_exists": os.path.exists(path),
            "catalog_is_tiny": catalog is None, "renderfleet_home": str(renderfleet_home())}


def collect_env(catalog: str | None = None) -> dict[str, Any]:
    """Everything `renderfleet env` reports, as one flat-ish mapping."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        **{name: package_version(name) for name in PACKAGES},
        **devices(),
        **catalog_in_use(catalog),
        "ray_address": os.environ.get("RAY_ADDRESS") or "(unset: a local cluster)",
        "aws_endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or "(unset)",
    }
