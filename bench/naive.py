"""Ray's own Stable Diffusion batch example, written the way its docs write it: the baseline of section (b).

A class over the pipeline in an ActorPoolStrategy, one pipeline call per row (batch_size=1), images
returned as arrays and collected on the driver with take_all(). Only what a CPU machine needs
changed: no fp16, no CUDA, and torch's thread count set to renderfleet's so threads are not the difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PredictCallable:
    """The example's callable: loads the pipeline once per actor, renders each row's prompt alone."""

    def __init__(self, model_id: str, width: int, height: int, steps: int, threads: int):
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(threads)
        self.pipe = StableDiffusionPipeline.from_pretrained(model_id)
        self.pipe.set_progress_bar_config(disable=True)
        self.width, self.height, self.steps = width, height, steps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        all_images = []
        for prompt in batch["prompt"]:
            image = self.pipe(str(prompt), width=self.width, height=self.height,
                              num_inference_steps=self.steps).images[0]
            all_images.append(np.array(image))
        return {"images": all_images}


def naive_job(prompts: list[str], model_dir: str, width: int, height: int, steps: int, threads: int,
              num_cpus: float = 1.0) -> list[dict[str, Any]]:
    """The example end to end: from_items, map_batches over the class, take_all on the driver."""
    import ray

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    preds = ds.map_batches(
        PredictCallable,
        batch_size=1,
        fn_constructor_kwargs=dict(model_id=model_dir, width=width, height=height, steps=steps, threads=threads),
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=num_cpus,
    )
    return preds.take_all()
