"""The deploy manifests point at code that exists and validates its arguments."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


def _builder(import_path: str):
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_serve_config_and_rayservice_import_paths_resolve():
    serve_config = yaml.safe_load((ROOT / "infra/serve-config.yaml").read_text())
    rayservice = yaml.safe_load((ROOT / "infra/rayservice.yaml").read_text())
    inner = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for app in serve_config["applications"] + inner["applications"]:
        builder = _builder(app["import_path"])
        assert callable(builder) and {"catalog", "store"} <= set(app["args"])
        with pytest.raises(ValueError, match="needs args: catalog, store"):
            builder({})


def test_rayjob_runs_the_cli():
    job = yaml.safe_load((ROOT / "infra/rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith("renderfleet render ")
