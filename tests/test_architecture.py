"""The layering, checked from the source: every import (inside functions too) of the four packages.

jobs -> cluster -> pipelines, storage. Ray only in cluster/ and jobs/; no torch in storage/ or the
torch-free media part; pipelines and storage never import each other; no import cycle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "storage", "cluster", "jobs")
MAX_LINES = 400

pytestmark = pytest.mark.timeout(60)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, absolute names resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            # `from pkg import submodule` imports the submodule too.
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names if f"{base}.{a.name}" in MODULES]
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# (who, what it may not import, why)
RULES = [
    (("pipelines", "storage"), "ray", "Ray lives in cluster/ and jobs/ only"),
    (("storage",), "torch", "storage/ knows nothing of torch"),
    (("storage",), "diffusers", "storage/ knows nothing of diffusers"),
    (("pipelines.media",), "torch", "the media part is torch-free"),
    (("pipelines.media",), "diffusers", "the media part is torch-free"),
    (("pipelines.media",), "transformers", "the media part is torch-free"),
    (("pipelines",), "storage", "pipelines and storage never import each other"),
    (("storage",), "pipelines", "pipelines and storage never import each other"),
    (("pipelines", "storage"), "cluster", "dependencies flow jobs -> cluster -> pipelines, storage"),
    (("pipelines", "storage", "cluster"), "jobs", "dependencies flow jobs -> cluster -> pipelines, storage"),
]


def test_every_package_is_parsed():
    assert {_top(m) for m in MODULES} == set(PACKAGES)
    assert any(_in(m, "pipelines.media") for m in MODULES)


@pytest.mark.parametrize("owners, banned, why", RULES, ids=[f"{'+'.join(o)}-x-{b}" for o, b, _ in RULES])
def test_layering(owners, banned, why):
    broken = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
              for m, found in IMPORTS.items() if any(_in(m, o) for o in owners)
              for target, line in found if _in(target, banned)]
    assert not broken, f"{why}:\n" + "\n".join(broken)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in found if t in MODULES and t != m} for m, found in IMPORTS.items()}


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_files_stay_small():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines: split them by concern:\n" + "\n".join(long)
