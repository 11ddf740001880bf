"""The commands that prepare or describe a setup: tiny models, the model list, the environment, an example project."""

from __future__ import annotations

import argparse
import os
import sys

from jobs.exits import UsageError


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from pipelines.tiny import build_tiny_models
    from pipelines.tiny.registry import TINY_MODELS

    unknown = [n for n in args.names if n not in TINY_MODELS]
    if unknown:
        raise UsageError(f"unknown tiny model{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(TINY_MODELS)}")
    print(build_tiny_models(args.dir, args.names or None))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from pipelines.catalog import Catalog

    path = args.catalog
    if not path:
        from pipelines.tiny import default_catalog_path

        path = default_catalog_path()
        print(f"catalog: {path} (the tiny random-weight models)", file=sys.stderr)
    catalog = Catalog.load(path)
    rows = [("NAME", "KIND", "TASKS", "SOURCE")]
    rows += [(m.name + (" *" if m.name == catalog.default_model else ""), m.kind, ",".join(m.tasks) or "-", m.source)
             for m in catalog.models.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    print("* default_model", file=sys.stderr)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from jobs.env import collect_env

    info = collect_env(args.catalog)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from jobs.init import init_project

    for path in init_project(args.dir, force=args.force):
        print(f"wrote {path}")
    print(f"next: read {os.path.join(args.dir, 'README.txt')}")
    return 0
