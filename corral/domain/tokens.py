"""Fencing and credential tokens: pure hashing and parsing (generation lives outside)."""

from __future__ import annotations

import hashlib
import hmac
import re

_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


def hash_secret(secret: str) -> str:
    """Tokens are stored only as their sha256; the plaintext leaves the server once."""
    return hashlib.sha256(secret.encode()).hexdigest()


def well_formed(secret: str | None) -> bool:
    return secret is not None and bool(_SECRET_RE.match(secret))


def same_hash(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return hmac.compare_digest(a, b)
