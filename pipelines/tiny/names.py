"""File names of a tiny build, shared by the factory (which writes them) and the fast path (which reads them)."""

MARKER_FILE = ".renderfleet-tiny-complete"
"""Written last into a model dir, so its presence means the build finished."""

CATALOG_FILE = "catalog.yaml"
"""Catalog file name under the build root."""

STAMP_FILE = ".factory-stamp.json"
"""Beside the catalog: the factory's source hash and the models a complete build made."""
