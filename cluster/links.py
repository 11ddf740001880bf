"""Signed, expiring links to stored outputs, for `url` responses from a local store."""

import base64
import binascii
import hashlib
import hmac
import json
import time

from cluster.api import APIError


def sign(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode("utf-8", "replace"), hashlib.sha256).hexdigest()


def make_token(secret: str, uri: str, ttl_s: int, now: float | None = None) -> str:
    """A token naming one stored output until `ttl_s` from now."""
    payload = base64.urlsafe_b64encode(json.dumps({"u": uri, "e": int((now or time.time()) + ttl_s)}).encode()).decode()
    return f"{payload}.{sign(secret, payload)}"


def read_token(secret: str, token: str) -> str:
    """The stored output a token names; 403 for any token we did not sign (compared as bytes: any text is safe)."""
    payload, _, signature = token.partition(".")
    if not hmac.compare_digest(sign(secret, payload).encode(), signature.encode("utf-8", "replace")):
        raise APIError(403, "invalid link", code="invalid_token")
    try:
        data = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
        uri, expires = data["u"], data["e"]
        if not isinstance(uri, str) or not isinstance(expires, (int, float)):
            raise TypeError
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise APIError(403, "invalid link", code="invalid_token") from None
    if expires < time.time():
        raise APIError(403, "link expired", code="expired_token")
    return uri
