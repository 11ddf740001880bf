"""Output keys: where each row's file lives under OUT.

Keys are `OUT/<task>/<xx>/<safe-id>.<ext>`: `xx` spreads objects over 256 prefixes
(S3 scales request rates per prefix; huge flat folders list slowly) and `safe-id`
is an injective encoding of the id that can never leave OUT.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

_SAFE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
_MAX_NAME = 120


def id_hash(row_id: str) -> str:
    """A stable hex digest of an id, used for prefixes and long names."""
    return hashlib.sha256(row_id.encode("utf-8")).hexdigest()


def safe_id(row_id: str) -> str:
    """Encodes an id as a single safe path component; distinct ids give distinct names."""
    if not row_id:
        raise ValueError("empty id")
    if _SAFE.fullmatch(row_id) and len(row_id) <= _MAX_NAME:
        return row_id
    # Percent-encode everything outside [A-Za-z0-9_-]: '.' too, so that names like '..' or '.hidden'
    # cannot appear, and '~' too (quote leaves it alone), so that '~' marks truncated names only.
    # '%' itself is encoded, so the mapping stays injective.
    encoded = urllib.parse.quote(row_id, safe="-_").replace(".", "%2E").replace("~", "%7E")
    if len(encoded) <= _MAX_NAME:
        return encoded
    # The only names with a '~': a prefix and the id's digest (128 bits), unlike every name above.
    return f"{encoded[:80]}~{id_hash(row_id)[:32]}"


def output_key(task: str, row_id: str, ext: str) -> str:
    """The key of a row's output, relative to OUT."""
    if not _SAFE.fullmatch(task) or not ext.isalnum():
        raise ValueError(f"bad task or extension: {task!r}, {ext!r}")
    return f"{task}/{id_hash(row_id)[:2]}/{safe_id(row_id)}.{ext}"
