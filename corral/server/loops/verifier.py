"""Verifier: prove claims before they count. An instance that reports holding an
object another instance already holds verified gets a `present` replica only once a
server has fetched those bytes from it (with a one-time grant, like any peer) and
hashed them; a claim that fails is refused with a WARNING event."""

from __future__ import annotations

import hashlib
import logging

import httpx

from corral.server.context import ServerContext
from corral.store import objects as objs

log = logging.getLogger("corral.verifier")
PEER_TOKEN_HEADER = "X-Corral-Peer-Token"
BATCH = 8


async def fetch_and_hash(
    client: httpx.AsyncClient, url: str, token: str, sha256: str, size: int
) -> str | None:
    """None if `url` serves exactly the object `sha256` of `size` bytes; else why not."""
    digest, got = hashlib.sha256(), 0
    try:
        async with client.stream("GET", url, headers={PEER_TOKEN_HEADER: token}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return f"its peer endpoint answered HTTP {resp.status_code}"
            async for chunk in resp.aiter_bytes(1024 * 1024):
                got += len(chunk)
                if got > size:
                    return f"it served more than the object's {size} bytes"
                digest.update(chunk)
    except httpx.HTTPError as exc:
        return f"its peer endpoint did not answer ({exc.__class__.__name__})"
    if got != size:
        return f"it served {got} of {size} bytes"
    if digest.hexdigest() != sha256:
        return f"the bytes it served hash to {digest.hexdigest()[:12]}…"
    return None


async def prove_once(ctx: ServerContext) -> bool:
    claims = await ctx.db.query(objs.claims_to_prove, BATCH)
    if not claims:
        return False
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=120)) as client:
        for claim in claims:
            token = await ctx.db.transact(objs.grant, claim.sha256, None, ctx.now())
            why = await fetch_and_hash(
                client, f"{claim.peer_url}/objects/{claim.sha256}", token, claim.sha256, claim.size
            )
            if why is None:
                await ctx.db.transact(objs.proved, claim, ctx.now())
                log.info("instance %s proved it holds %s", claim.instance_name, claim.sha256[:12])
            else:
                await ctx.db.transact(objs.disproved, claim, why, ctx.now())
                log.warning(
                    "instance %s could not prove it holds %s: %s",
                    claim.instance_name,
                    claim.sha256[:12],
                    why,
                )
    ctx.notifier.wake("drain")
    return len(claims) == BATCH
