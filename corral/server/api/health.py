"""/health (unauthenticated: for load balancers and people) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corral.server.context import ServerContext, get_ctx
from corral.server.health import health_report

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness, database reachability and health flags")
async def health(ctx: ServerContext = Depends(get_ctx)) -> JSONResponse:
    report = await health_report(ctx)
    return JSONResponse(report, status_code=200 if report["database"] == "ok" else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
