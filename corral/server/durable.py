"""The server's side of a fleet's durable store: confirming that an upload landed."""

from __future__ import annotations

import httpx

from corral.domain.presign import SHA_HEADER, DurableStore


async def confirm(store: DurableStore, sha256: str, size: int, now: float) -> str | None:
    """None if the bucket holds `sha256` with the right size and checksum; else why not."""
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.head(store.signed("HEAD", sha256, now, 300))
    except httpx.HTTPError as exc:
        return f"durable store unreachable: {exc}"
    if resp.status_code == 404:
        return "not in the durable store"
    if resp.status_code != 200:
        return f"durable store answered HTTP {resp.status_code}"
    got_size = int(resp.headers.get("content-length", "-1"))
    got_sha = resp.headers.get(SHA_HEADER)
    if got_size != size or got_sha != sha256:
        return (
            f"durable store holds {got_size} bytes with sha256 {got_sha!r}, "
            f"not {size} bytes with {sha256}"
        )
    return None
