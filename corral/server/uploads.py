"""Content-addressed files on the server: request bodies stored under their sha256."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

from fastapi import Request

from corral.server.errors import ApiError


def check_sha256(sha256: str) -> None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ApiError(422, "invalid_request", "sha256: expected 64 lowercase hex digits")


async def receive(
    request: Request, directory: Path, limit: int, what: str, allow_empty: bool = False
) -> tuple[str, int]:
    """Stream the body to `directory/SHA256`: durable, and there only when complete
    (nothing is left behind by a body that is too large, empty or cut off)."""
    tmp = directory / f".upload-{secrets.token_hex(8)}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:  # noqa: ASYNC230 - page-cache writes; fsync in a thread
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"{what}s are limited to {limit} bytes")
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        if size == 0 and not allow_empty:
            raise ApiError(422, "invalid_request", f"body: the {what} is empty")
        sha = digest.hexdigest()
        os.replace(tmp, directory / sha)
    finally:
        tmp.unlink(missing_ok=True)
    return sha, size
