"""The per-actor model pool: loaded checkpoints, ControlNets and adapters under a memory budget.

A model is loaded on the host, measured there, and only placed on the device once least
recently used models have been evicted to make room, so two models never share an
accelerator during a switch. Entries over the same checkpoint share its weights (`from_pipe`).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.adapters import AdapterState
from pipelines.catalog import Catalog, ModelEntry, renderfleet_home
from pipelines.fingerprint import weights_hash
from pipelines.loading import ModelLoadError, apply_policy, derive, load_base, load_controlnet, memory_bytes, pick_dtype
from storage.cache import fetch_prefix
from storage.fs import is_remote
from storage.reasons import RowError

log = logging.getLogger(__name__)


def default_budget(device: torch.device) -> int:
    """Most of the accelerator's memory, or half of the host's available memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


@dataclass
class _Resident:
    """One placed model: a checkpoint (with its adapters) or a ControlNet."""

    model: Any
    nbytes: int
    adapters: AdapterState = field(default_factory=AdapterState)


class ModelPool:
    """Loads, places, shares and evicts models for one actor; counts loads."""

    def __init__(self, catalog: Catalog, device: torch.device, budget_bytes: int, cache_dir: str | None = None):
        self.catalog = catalog
        self.device = device
        self.budget = budget_bytes
        self.cache_dir = cache_dir or str(renderfleet_home() / "models")
        self.resident: OrderedDict[tuple, _Resident] = OrderedDict()  # LRU, oldest first
        self.pipelines: dict[str, tuple[tuple[tuple, ...], Any]] = {}  # entry name -> (resident keys used, pipeline)
        self.load_errors: dict[str, str] = {}
        self.loads = 0  # checkpoints loaded (ControlNets ride along with theirs)
        self.events: deque[tuple[str, str, int, int]] = deque(maxlen=1000)  # (place|evict, model, bytes, resident after)
        self._hashes: dict[str, str] = {}

    # -- public ------------------------------------------------------------------------------

    def stages(self, entry: ModelEntry) -> list[Any]:
        """The entry's pipeline and its cascade's later stages, loading what is missing."""
        return [self.pipeline(entry)] + [self.pipeline(self.catalog.pipeline(n)) for n in entry.stages]

    def pipeline(self, entry: ModelEntry) -> Any:
        """The loaded pipeline for `entry` (a failure is remembered and fails later rows at once)."""
        if entry.name in self.load_errors:
            raise RowError("model_load_error", self.load_errors[entry.name])
        known = self.pipelines.get(entry.name)
        if known is not None and all(k in self.resident for k in known[0]):
            for k in known[0]:
                self.resident.move_to_end(k)
            return known[1]
        try:
            keys = [self._base(entry)]
            components = {}
            if entry.controlnets:
                keys += [self._controlnet(self.catalog.get(n)) for n in entry.controlnets]
                nets = [self.resident[k].model for k in keys[1:]]
                components["controlnet"] = nets[0] if len(nets) == 1 else nets
            pipe = derive(self.resident[keys[0]].model, entry.pipeline_class, **components)
        except (ModelLoadError, FileNotFoundError, OSError) as e:
            self.load_errors[entry.name] = f"model {entry.name!r}: {e}"
            raise RowError("model_load_error", self.load_errors[entry.name]) from None
        self.pipelines[entry.name] = (tuple(keys), pipe)
        return pipe

    def adapters(self, entry: ModelEntry) -> AdapterState:
        """The adapter state of the checkpoint under a loaded entry."""
        return self.resident[self.pipelines[entry.name][0][0]].adapters

    def local(self, source: str) -> str:
        """A local dir or Hub id for a source (s3:// goes through the node's cache)."""
        return str(fetch_prefix(source, self.cache_dir)) if is_remote(source) else source

    def model_hash(self, entry: ModelEntry) -> str:
        """A content hash of the entry's weights, computed once per actor (cached beside local weights)."""
        if entry.name not in self._hashes:
            source = self.local(entry.source)
            self._hashes[entry.name] = (weights_hash(source) if os.path.isdir(source)
                                        else f"hub:{source}@{entry.revision or 'main'}")
        return self._hashes[entry.name]

    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())

    # -- loading -----------------------------------------------------------------------------

    def _base(self, entry: ModelEntry) -> tuple:
        """The checkpoint under an entry, shared by every entry over the same source."""
        dtype = pick_dtype(entry.dtype, self.device)
        key = ("checkpoint", entry.source, entry.revision, str(dtype))
        if key in self.resident:
            self.resident.move_to_end(key)
            return key
        started = time.perf_counter()
        base = load_base(self.local(entry.source), entry.revision, dtype)  # on the host
        self._place(key, entry.name, base, lambda: apply_policy(base, entry.policy, self.device))
        self.loads += 1
        log.info("loaded %s (%.0f MB) in %.1fs on %s", entry.name, self.resident[key].nbytes / 2**20,
                 time.perf_counter() - started, self.device)
        return key

    def _controlnet(self, entry: ModelEntry) -> tuple:
        dtype = pick_dtype(entry.dtype, self.device)
        key = ("controlnet", entry.source, entry.revision, str(dtype))
        if key in self.resident:
            self.resident.move_to_end(key)
            return key
        net = load_controlnet(self.local(entry.source), entry.revision, dtype)  # on the host
        self._place(key, entry.name, net, lambda: net.to(self.device))
        return key

    def _place(self, key: tuple, name: str, model: Any, place: Any) -> None:
        """Evicts until `model` fits the budget, then moves it to the device."""
        size = memory_bytes(model)
        self._evict(size)
        place()
        self.resident[key] = _Resident(model, size)
        self.events.append(("place", name, size, self.resident_bytes()))

    def _evict(self, incoming: int) -> None:
        """Drops least recently used models until `incoming` more bytes fit the budget."""
        if incoming > self.budget:
            log.warning("a %.0f MB model is over the %.0f MB budget: loading it alone", incoming / 2**20, self.budget / 2**20)
        evicted = False
        while self.resident and self.resident_bytes() + incoming > self.budget:
            key, gone = self.resident.popitem(last=False)
            for name in [n for n, (keys, _) in self.pipelines.items() if key in keys]:
                del self.pipelines[name]
            self.events.append(("evict", key[1], gone.nbytes, self.resident_bytes()))
            log.info("evicted %s to stay within %.0f MB", key[1], self.budget / 2**20)
            del gone
            evicted = True
        if evicted:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
