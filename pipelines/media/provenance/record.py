"""The provenance record: what made an output, as a flat ``{str: str}`` dict, and its JSON form.

:func:`provenance_record` builds it (generator, model and its weights' sha256, seed, steps,
guidance, job and row ids, and the prompt's sha256, or the prompt itself only on request); every
format module writes it with :func:`record_json` and reads it back with :func:`parse_record`.
"""

from __future__ import annotations

import hashlib
import json
import re

__all__ = [
    "COMMENT_TAG",
    "GENERATOR",
    "RECORD_KEY",
    "TRAINED_ALGORITHMIC_MEDIA",
    "checked_record",
    "parse_record",
    "provenance_record",
    "record_json",
]

GENERATOR = "renderfleet"

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
"""IPTC digital source type for media created by a trained model."""

RECORD_KEY = "renderfleet"
"""PNG text keyword (and glTF ``asset.extras`` key) holding the JSON record."""

COMMENT_TAG = "renderfleet-provenance"
"""Prefix of the comment carrying the JSON record in GIF, PLY and OBJ."""

_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,78}$")


def _sha256_text(text: str) -> str:
    """Hex sha256 of UTF-8 text: the prompt fingerprint."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def provenance_record(
    *,
    version: str,
    model: str,
    model_hash: str,
    seed: int,
    steps: int | None,
    guidance: float | None,
    job_id: str,
    row_id: str,
    prompt: str | None,
    include_prompt: bool = False,
) -> dict[str, str]:
    """The flat string record embedded in outputs.

    Keys, in order: ``generator`` ("renderfleet <version>"), ``model``, ``model_sha256``,
    ``seed``, ``steps``, ``guidance``, ``job_id``, ``row_id`` and then either ``prompt``
    (only with ``include_prompt``) or ``prompt_sha256`` (the privacy default: the hex
    sha256 of the UTF-8 prompt, which lets the owner of a prompt match it without the
    file disclosing it).  ``steps``/``guidance``/prompt keys are left out when None.
    """
    record = {
        "generator": f"{GENERATOR} {version}".strip(),
        "model": str(model),
        "model_sha256": str(model_hash),
        "seed": str(int(seed)),
    }
    if steps is not None:
        record["steps"] = str(int(steps))
    if guidance is not None:
        record["guidance"] = repr(float(guidance))
    record["job_id"] = str(job_id)
    record["row_id"] = str(row_id)
    if prompt is not None:
        if include_prompt:
            record["prompt"] = str(prompt)
        else:
            record["prompt_sha256"] = _sha256_text(str(prompt))
    return record


def checked_record(record: dict[str, str]) -> dict[str, str]:
    """The record, after checking that keys are portable tag names and values are strings."""
    if not isinstance(record, dict) or not record:
        raise ValueError("provenance record must be a non-empty dict of str -> str")
    for key, value in record.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"record key {key!r} is not a portable tag name (a letter, then letters, digits or _; at most 79)"
            )
        if not isinstance(value, str):
            raise TypeError(f"record value for {key!r} must be a str, got {type(value).__name__}")
    return dict(record)


def record_json(record: dict[str, str]) -> str:
    """Compact ASCII JSON (non-ASCII and control characters escaped), safe for any text field."""
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def parse_record(text: str | bytes) -> dict[str, str]:
    """A record parsed from JSON, or {} when it is not a JSON object of strings."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
