"""The web dashboard: server-rendered pages, no build step.

Open `/?token=<admin token>` once (corral up prints that link); the token is kept in an
HttpOnly cookie for the session.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from corral.server.context import ServerContext, get_ctx
from corral.server.health import health_report
from corral.server.views import (
    event_view,
    fleet_views,
    instance_view,
    job_view,
    rollout_view,
    server_view,
)
from corral.store import components, events, instances, servers, tokens
from corral.store import jobs as jobs_repo

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
COOKIE = "corral_token"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


templates.env.filters["when"] = _when


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, ctx: ServerContext = Depends(get_ctx)):
    query_token = request.query_params.get("token")
    if query_token:
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, query_token, httponly=True, samesite="strict")
        return response
    secret = request.cookies.get(COOKIE)
    row = await ctx.db.query(tokens.lookup, secret) if secret else None
    if row is None or row["kind"] != tokens.ADMIN:
        return templates.TemplateResponse(
            request, "login.html", {"data_dir": str(ctx.config.data_dir)}, status_code=401
        )
    now = ctx.now()

    async def gather(conn):
        return (
            await jobs_repo.list_jobs(conn, limit=50),
            await jobs_repo.count_jobs_by_state(conn),
            await instances.list_instances(conn, include_terminated=False),
            await events.list_events(conn, min_level="info", limit=30, newest=True),
            await servers.list_servers(conn, include_stopped_since=now - 3600),
            await fleet_views(conn),
            [await rollout_view(conn, r) for r in await components.list_rollouts(conn, 10)],
        )

    (
        job_rows,
        counts,
        inst_rows,
        event_rows,
        server_rows,
        fleet_rows,
        rollout_rows,
    ) = await ctx.db.query(gather)
    return templates.TemplateResponse(
        request,
        "dashboard.html",
        {
            "jobs": [job_view(r) for r in job_rows],
            "counts": counts,
            "instances": [instance_view(r) for r in inst_rows],
            "events": list(reversed([event_view(r) for r in event_rows])),
            "servers": [server_view(r, now, ctx.config.server_grace) for r in server_rows],
            "health": await health_report(ctx),
            "fleets": fleet_rows,
            "rollouts": rollout_rows,
        },
    )
