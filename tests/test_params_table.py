"""The parameter table is the one place call parameters are listed: everything else derives from it."""

from __future__ import annotations

import pytest

from cluster import api
from pipelines.media.formats import TASK_FORMATS, TASKS
from storage.manifest import MANIFEST_COLUMNS
from storage.params import PARAMETERS, ROW_DEFAULTS, Limits, resolve_row
from storage.reasons import REASONS

pytestmark = pytest.mark.timeout(60)

MODELS = {"image": api.ImageGenerationRequest, "edit": api.ImageEditRequest, "video": api.VideoGenerationRequest,
          "audio": api.AudioGenerationRequest, "mesh": api.MeshGenerationRequest}


@pytest.mark.parametrize("param", PARAMETERS, ids=[p.name for p in PARAMETERS])
def test_each_parameter_reaches_every_place(param):
    assert MANIFEST_COLUMNS[param.name] == param.kind
    assert param.name in ROW_DEFAULTS
    assert param.reason in REASONS and REASONS[param.reason].client_error
    for task in TASKS:
        assert (param.name in MODELS[task].model_fields) == (not param.tasks or task in param.tasks), task
    low, high = param.bounds(Limits())
    row = {"id": "r", "prompt": "p", param.name: high, "task": param.tasks[0] if param.tasks else "image"}
    if row["task"] == "edit":
        row["image_uri"] = "x.png"
    resolved = resolve_row(row, {}, Limits(), TASK_FORMATS)
    assert getattr(resolved, param.name) == high
    assert (param.name in dict(resolved.call_values())) == param.call


def test_request_models_reject_with_the_tables_reason():
    for param in PARAMETERS:
        task = param.tasks[0] if param.tasks else "image"
        _, high = param.bounds(Limits())
        with pytest.raises(Exception) as e:
            MODELS[task].model_validate({"prompt": "p", param.name: high + 1}, context={"limits": Limits()})
        assert e.value.errors()[0]["type"] == param.reason
