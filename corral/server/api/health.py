"""/health (unauthenticated: for load balancers and people), /metrics and /docs (an
admin token, as a bearer token or the dashboard's cookie, unless the server runs with
--public-metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from corral.server import metrics as m
from corral.server.auth import require_admin
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import DASHBOARD_COOKIE
from corral.server.health import health_report
from corral.store import metrics as store_metrics
from corral.store import tokens
from corral.store.db import DatabaseError

router = APIRouter(tags=["health"])


async def require_observer(request: Request, ctx: ServerContext = Depends(get_ctx)) -> None:
    if ctx.config.public_metrics:
        return
    cookie = request.cookies.get(DASHBOARD_COOKIE)
    if cookie and "authorization" not in request.headers:
        row = await ctx.db.query(tokens.lookup, cookie)
        if row is None or row["kind"] != tokens.ADMIN:
            raise ApiError(401, "unauthorized", "unknown or revoked token")
        return
    await require_admin(request, ctx)


@router.get("/health", summary="Liveness, database reachability and health flags")
async def health(ctx: ServerContext = Depends(get_ctx)) -> JSONResponse:
    report = await health_report(ctx)
    return JSONResponse(report, status_code=200 if report["database"] == "ok" else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (an admin token unless --public-metrics)",
    dependencies=[Depends(require_observer)],
    response_class=Response,
    responses={200: {"content": {m.CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def metrics(ctx: ServerContext = Depends(get_ctx)) -> Response:
    """This process's counters and histograms, and fleet-wide gauges read from the
    database now (left out, and counted as a database error, if it cannot be read)."""
    try:
        snap = await ctx.db.query(store_metrics.snapshot)
    except (DatabaseError, OSError):
        m.DATABASE_ERRORS.labels("metrics").inc()
        snap = None
    body = m.exposition(snap, ctx.db.engine.pool, ctx.db.statements)
    return Response(body, media_type=m.CONTENT_TYPE_LATEST)


@router.get("/docs", include_in_schema=False, dependencies=[Depends(require_observer)])
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="corral API")
