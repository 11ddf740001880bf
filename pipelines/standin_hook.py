"""A cheap Ray `worker_process_setup_hook` for the stand-in renderer (pipelines/tiny/standin.py).

Registering the stand-in imports diffusers (and `pipelines.tiny`, seconds per process), and a setup hook runs
in every worker, read and shuffle tasks included: on a small cluster that cost tens of seconds per job. This
hook imports nothing heavy; it registers the stand-in right after a process first imports diffusers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

HOOK = "pipelines.standin_hook.register_on_import"  # the value for runtime_env["worker_process_setup_hook"]


class _AfterDiffusers(importlib.abc.MetaPathFinder):
    """Finds diffusers the usual way and wraps its loader so the stand-in is registered once it is loaded."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != "diffusers":
            return None
        sys.meta_path.remove(self)  # once, and so the lookup below does not come back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: ModuleType) -> None:
            exec_module(module)
            from pipelines.tiny.standin import register

            register()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def register_on_import() -> None:
    """Registers the stand-in now if diffusers is loaded, else as soon as it is."""
    if "diffusers" in sys.modules:
        from pipelines.tiny.standin import register

        register()
    elif not any(isinstance(f, _AfterDiffusers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterDiffusers())
