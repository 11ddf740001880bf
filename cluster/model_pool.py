"""The per-actor model pool: loaded checkpoints, ControlNets and adapters under a memory budget.

A model is loaded on the host, measured there, and only placed on the device once least
recently used models have been evicted to make room, so two models never share an
accelerator during a switch. Entries over the same checkpoint share its weights (`from_pipe`).
A job's policy overrides apply to every model it loads; an actor holding a fraction of a GPU
gets the same fraction of the device's memory as its budget.
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

from cluster.renderer_config import PoolOptions  # noqa: F401 - its home; re-exported
from pipelines.adapters import AdapterState
from pipelines.catalog import Catalog, ModelEntry, Policy, renderfleet_home
from pipelines.fingerprint import weights_hash
from pipelines.loading import ModelLoadError, derive, load_base, load_controlnet, memory_bytes, pick_dtype
from pipelines.placement import compile_seconds, free_device_bytes, place
from storage.cache import fetch_prefix
from storage.fs import is_remote
from storage.reasons import RowError

log = logging.getLogger(__name__)


def share_budget(total_bytes: int, share: float = 1.0) -> int:
    """Most (80%) of the actor's share of a device: 0.5 GPU gets half of what a whole one would (more than one: one device's)."""
    return int(total_bytes * 0.8 * (share if 0 < share < 1 else 1.0))


def default_budget(device: torch.device, gpu_share: float = 1.0) -> int:
    """The actor's share of the accelerator's memory, or half of the host's available memory on CPU."""
    if device.type == "cuda":
        return share_budget(torch.cuda.get_device_properties(device).total_memory, gpu_share)
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

    def __init__(self, catalog: Catalog, device: torch.device, budget_bytes: int | None = None, cache_dir: str | None = None,
                 options: PoolOptions | None = None):
        self.catalog = catalog
        self.device = device
        self.options = options or PoolOptions()
        self.budget = budget_bytes or default_budget(device, self.options.gpu_share)
        self.cache_dir = cache_dir or str(renderfleet_home() / "models")
        self.resident: OrderedDict[tuple, _Resident] = OrderedDict()  # LRU, oldest first
        self.pipelines: dict[str, tuple[tuple[tuple, ...], Any]] = {}  # entry name -> (resident keys used, pipeline)
        self.load_errors: dict[str, str] = {}
        self.loads = 0  # checkpoints loaded (ControlNets ride along with theirs)
        self.events: deque[tuple[str, str, int, int]] = deque(maxlen=1000)  # (place|evict, model, bytes, resident after)
        self._hashes: dict[str, str] = {}
        self.figures: dict[str, dict[str, Any]] = {}  # entry -> load_s, offload, applied, compile_s (reported apart)

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

    def clear(self) -> None:
        """Drops every resident model (benchmarks switching architectures, tests)."""
        self.resident.clear()
        self.pipelines.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def policy(self, entry: ModelEntry) -> Policy:
        """The entry's catalog policy under this job's overrides."""
        return entry.policy.overridden(self.options.policy, f"policy of {entry.name}") if self.options.policy else entry.policy

    def compile_s(self) -> float:
        """Seconds this actor has spent in torch.compile so far, first-render recompiles included."""
        return compile_seconds()

    def adopt(self, entry: ModelEntry, pipe: Any) -> Any:
        """A pipeline built in this process (benchmarks, notebooks) joins the pool as if loaded from `entry`."""
        key = ("checkpoint", entry.source, entry.revision, str(pipe.dtype))
        self._placed(key, entry, pipe, time.perf_counter())
        self.pipelines[entry.name] = ((key,), pipe)
        return pipe

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
        self._placed(key, entry, base, started)
        self.loads += 1
        return key

    def _placed(self, key: tuple, entry: ModelEntry, base: Any, started: float) -> None:
        """Places a checkpoint under its (overridden) policy and records the figures, compile apart from load."""
        policy = self.policy(entry)
        done: list[Any] = []
        self._place(key, entry.name, base, lambda free: done.append(place(base, policy, self.device, free)),
                    offloadable=policy.offload == "auto")
        placed = done[0]
        if placed.offload != "none":  # offloaded weights live on the host: the device holds only what is onloaded
            self.resident[key].nbytes = placed.device_bytes
        load_s = time.perf_counter() - started - (placed.compile_s or 0.0)
        self.figures[entry.name] = {"load_s": round(load_s, 3), "offload": placed.offload, "applied": placed.applied,
                                    "compiled": placed.compiled, "compile_s": placed.compile_s}
        log.info("loaded %s (%.0f MB) in %.1fs on %s (offload %s%s)", entry.name, memory_bytes(base) / 2**20, load_s,
                 self.device, placed.offload, "" if placed.compile_s is None else f", compiled in {placed.compile_s:.1f}s")

    def _controlnet(self, entry: ModelEntry) -> tuple:
        dtype = pick_dtype(entry.dtype, self.device)
        key = ("controlnet", entry.source, entry.revision, str(dtype))
        if key in self.resident:
            self.resident.move_to_end(key)
            return key
        net = load_controlnet(self.local(entry.source), entry.revision, dtype)  # on the host
        self._place(key, entry.name, net, lambda free: net.to(self.device))
        return key

    def _place(self, key: tuple, name: str, model: Any, place_on: Any, offloadable: bool = False) -> None:
        """Evicts until `model` fits the budget (or, when it may offload, as much as can), then places it.

        `place_on(free)` gets the bytes left to this actor: its budget less what stays resident, and
        on an accelerator no more than the device has free (actors sharing it included)."""
        size = memory_bytes(model)
        self._evict(min(size, self.budget) if offloadable else size)
        free = self.budget - self.resident_bytes()
        device_free = free_device_bytes(self.device)
        place_on(free if device_free is None else min(free, device_free))
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
