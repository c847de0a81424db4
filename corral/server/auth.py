"""Bearer-token authentication: admin (users), join (new agents), agent (one instance)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import SCOPE_TOKEN_ROW
from corral.store import tokens

ATTEMPT_TOKEN_HEADER = "X-Corral-Attempt-Token"


@dataclass(frozen=True)
class Principal:
    kind: str
    token_id: str
    instance_id: str | None = None
    credential_hash: str | None = None  # sha256 of the secret (lease renewals find it by it)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer ...)")
    return value.strip()


TOUCH_EVERY = 60.0  # seconds between two recorded uses of one credential


async def _principal(request: Request, ctx: ServerContext, kinds: tuple[str, ...]) -> Principal:
    secret = _bearer(request)
    checked = request.scope.get(SCOPE_TOKEN_ROW)  # the body guard looked it up already
    if checked is not None and checked[0] == secret:
        row = checked[1]
    else:
        row = await ctx.db.query_one(tokens.lookup, secret)
    if row is None:
        raise ApiError(401, "unauthorized", await ctx.db.query(tokens.why_refused, secret))
    if row["kind"] not in kinds:
        raise ApiError(403, "forbidden", f"a {row['kind']} token cannot do this")
    now = ctx.now()
    last = row["last_used_at"]
    if last is None:  # its first use shows at once
        await ctx.db.transact(tokens.touch, row["id"], now)
    elif now - last >= TOUCH_EVERY:
        ctx.leases.used(row["id"], now)  # written with the next lease flush (leases.py)
    return Principal(row["kind"], row["id"], row["instance_id"], row["token_hash"])


async def require_admin(request: Request, ctx: ServerContext = Depends(get_ctx)) -> Principal:
    return await _principal(request, ctx, (tokens.ADMIN,))


async def require_agent(request: Request, ctx: ServerContext = Depends(get_ctx)) -> Principal:
    return await _principal(request, ctx, (tokens.AGENT,))


async def require_joiner(request: Request, ctx: ServerContext = Depends(get_ctx)) -> Principal:
    """Registration: a join token (new agent) or an agent credential (restart)."""
    return await _principal(request, ctx, (tokens.JOIN, tokens.AGENT, tokens.ADMIN))


async def attempt_token(request: Request) -> str:
    value = request.headers.get(ATTEMPT_TOKEN_HEADER)
    if not value:
        raise ApiError(401, "unauthorized", f"missing {ATTEMPT_TOKEN_HEADER} header")
    return value
