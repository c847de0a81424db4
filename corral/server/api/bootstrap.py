"""GET /api/v1/bootstrap.sh: install an agent on a fresh host, safely."""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2
from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse

from corral.api import NAME_PATTERN
from corral.server.context import ServerContext, get_ctx
from corral.store import components

router = APIRouter(prefix="/api/v1", tags=["agents"])

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent.parent / "templates")),
    autoescape=False,  # noqa: S701 - a shell script: values go through the shq filter
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_env.filters["shq"] = lambda v: shlex.quote(str(v or ""))
UNIT = Path(__file__).parent.parent.parent / "deploy" / "corral-agent.service"


async def render(ctx: ServerContext, fleet: str | None) -> str:
    """The bootstrap script for a fleet (what GET /api/v1/bootstrap.sh returns; the
    SSH backend runs the same script on its hosts)."""

    async def desired(conn):
        d = None
        if fleet:
            d = await components.current_desired(conn, fleet, "agent")
        d = d or await components.current_desired(conn, components.ALL_FLEETS, "agent")
        return await components.get_component(conn, "agent", d["version"]) if d else None

    art = await ctx.db.query(desired)
    return _env.get_template("bootstrap.sh").render(
        server=ctx.config.url,
        where=f"fleet {fleet}" if fleet else "any fleet",
        query=f"?fleet={fleet}" if fleet else "",
        url=art["url"] if art else "",
        sha256=art["sha256"] if art else "",
        version=art["version"] if art else "",
        fleet=fleet or "",
        unit=UNIT.read_text(),
    )


@router.get(
    "/bootstrap.sh",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/x-shellscript": {}}}},
    summary="Shell script that installs the fleet's agent build on a fresh host",
)
async def bootstrap(
    fleet: str | None = Query(default=None, pattern=NAME_PATTERN),
    ctx: ServerContext = Depends(get_ctx),
) -> PlainTextResponse:
    return PlainTextResponse(await render(ctx, fleet), media_type="text/x-shellscript")
