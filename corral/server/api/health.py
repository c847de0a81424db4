"""/health (unauthenticated: for load balancers and people) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from corral.server import metrics as m
from corral.server.context import ServerContext, get_ctx
from corral.server.health import health_report
from corral.store import metrics as store_metrics
from corral.store.db import DatabaseError

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness, database reachability and health flags")
async def health(ctx: ServerContext = Depends(get_ctx)) -> JSONResponse:
    report = await health_report(ctx)
    return JSONResponse(report, status_code=200 if report["database"] == "ok" else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(ctx: ServerContext = Depends(get_ctx)) -> Response:
    """This process's counters and histograms, and fleet-wide gauges read from the
    database now (left out, and counted as a database error, if it cannot be read)."""
    try:
        snap = await ctx.db.query(store_metrics.snapshot)
    except (DatabaseError, OSError):
        m.DATABASE_ERRORS.labels("metrics").inc()
        snap = None
    return Response(m.exposition(snap, ctx.db.engine.pool), media_type=m.CONTENT_TYPE_LATEST)
