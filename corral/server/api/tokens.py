"""Credentials: list them (never their secrets), rotate the admin or join token, revoke
any one of them. Admin only; every change takes effect at the next request."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Depends

from corral.api import TokenRotated, TokenView
from corral.server.auth import Principal, require_admin
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.secretfiles import write_secret_file
from corral.store import events, tokens

log = logging.getLogger("corral.server")

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], dependencies=[Depends(require_admin)])

# where the server keeps the plaintext of its admin and join tokens (see corral.server.app)
TOKEN_FILES = {tokens.ADMIN: "admin.token", tokens.JOIN: "join.token"}


def token_view(row) -> TokenView:
    return TokenView(
        id=row["id"],
        kind=row["kind"],
        instance_id=row["instance_id"],
        note=row["note"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


@router.get("", response_model=list[TokenView], summary="List credentials (never their secrets)")
async def list_tokens(ctx: ServerContext = Depends(get_ctx)) -> list[TokenView]:
    return [token_view(r) for r in await ctx.db.query(tokens.list_tokens)]


@router.post(
    "/rotate/{kind}",
    response_model=TokenRotated,
    summary="Replace the admin or join token: the old ones stop working at once",
)
async def rotate(
    kind: Literal["admin", "join"],
    who: Principal = Depends(require_admin),
    ctx: ServerContext = Depends(get_ctx),
) -> TokenRotated:
    now = ctx.now()

    async def go(conn):
        token_id, secret, revoked = await tokens.rotate(
            conn, kind, now, f"{kind} (rotated by token {who.token_id})"
        )
        await events.record(
            conn,
            now,
            "warning",
            "token.rotated",
            f"the {kind} token was rotated by token {who.token_id}: {revoked} old "
            f"{kind} token(s) revoked, new token {token_id}",
            server_id=ctx.server_id,
        )
        return token_id, secret, revoked

    token_id, secret, revoked = await ctx.db.transact(go)
    # this server's own copy, for `corral up`, local agents and people on this machine
    write_secret_file(ctx.config.data_dir / TOKEN_FILES[kind], secret)
    if kind == tokens.ADMIN:
        ctx.admin_token = secret
    else:
        ctx.join_token = secret
    return TokenRotated(id=token_id, kind=kind, secret=secret, revoked=revoked)


@router.post(
    "/{token_id}/revoke",
    response_model=TokenView,
    summary="Revoke one credential at once (an agent's: that agent exits)",
)
async def revoke(
    token_id: str,
    who: Principal = Depends(require_admin),
    ctx: ServerContext = Depends(get_ctx),
) -> TokenView:
    now = ctx.now()

    async def go(conn):
        try:
            row = await tokens.revoke(conn, token_id, now)
        except tokens.LastAdmin:
            raise ApiError(
                409,
                "last_admin_token",
                f"token {token_id} is the last admin token: rotate it instead "
                "(corral tokens rotate admin)",
            ) from None
        if row is None:
            raise ApiError(404, "not_found", f"token {token_id} not found (see corral tokens)")
        await events.record(
            conn,
            now,
            "warning",
            "token.revoked",
            f"{row['kind']} token {token_id} was revoked by token {who.token_id}",
            instance_id=row["instance_id"],
            server_id=ctx.server_id,
        )
        return row

    row = await ctx.db.transact(go)
    if row["instance_id"] is not None:  # its lease renewals stop here at once
        ctx.leases.forget(row["instance_id"])
    return token_view(row)
