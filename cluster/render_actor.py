"""The class Ray Data's actor pool runs. It imports the renderer (torch, diffusers, the pipelines) inside the
actor, so the driver that plans the job never does: that import is seconds of every job's start-up."""

from __future__ import annotations

from typing import Any

from cluster.renderer_config import RendererConfig


class RenderActor:
    """A `cluster.renderer.Renderer` built in the actor; each batch of manifest rows in, its result rows out."""

    def __init__(self, config: RendererConfig):
        from cluster.renderer import Renderer

        self.renderer = Renderer(config)

    def __call__(self, batch: Any) -> Any:
        return self.renderer(batch)
