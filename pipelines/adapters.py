"""LoRA adapters and textual-inversion embeddings, loaded once per pipeline and switched per call.

Loaded LoRAs are kept per pipeline up to a capacity (least recently used go first), so a
manifest that alternates adapter sets switches weights instead of reloading files.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from diffusers import DiffusionPipeline


@dataclass(frozen=True)
class Lora:
    name: str  # adapter name: a catalog name, or a digest of the URI
    path: str  # local file or directory
    scale: float


@dataclass(frozen=True)
class Embedding:
    name: str
    path: str
    token: str | None


@dataclass
class AdapterState:
    """What one pipeline (one set of shared weights) has loaded."""

    capacity: int = 8
    loras: OrderedDict[str, str] = field(default_factory=OrderedDict)
    embeddings: set[str] = field(default_factory=set)
    active: tuple[tuple[str, float], ...] = ()
    loads: int = 0

    def activate(self, pipe: DiffusionPipeline, loras: list[Lora], embeddings: list[Embedding]) -> None:
        """Makes exactly `loras` (at their scales) active on `pipe`, and `embeddings` available."""
        for e in embeddings:
            if e.name not in self.embeddings:
                pipe.load_textual_inversion(e.path, token=e.token)
                self.embeddings.add(e.name)
        wanted = tuple((lora.name, lora.scale) for lora in loras)
        for lora in loras:
            if lora.name in self.loras:
                self.loras.move_to_end(lora.name)
                continue
            while len(self.loras) >= self.capacity:
                old, _ = self.loras.popitem(last=False)
                pipe.delete_adapters(old)
                self.active = tuple(a for a in self.active if a[0] != old)
            pipe.load_lora_weights(lora.path, adapter_name=lora.name)
            self.loras[lora.name] = lora.path
            self.loads += 1
            self.active = ("<changed>",)  # loading activates the new adapter: set again below
        if wanted == self.active:
            return
        if wanted:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in wanted], adapter_weights=[s for _, s in wanted])
        elif self.loras:
            pipe.disable_lora()
        self.active = wanted
