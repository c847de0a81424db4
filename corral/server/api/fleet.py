"""Instances, events and servers: what the fleet and the control plane look like."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query

from corral.api import EventView, InstanceView, ServerView
from corral.api.common import INT64_MAX, INT64_MIN
from corral.server.auth import require_admin
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.views import event_view, instance_view, server_view
from corral.store import events, instances, servers

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_admin)])

EVENTS_KEY = "events"


@router.get("/instances", response_model=list[InstanceView], tags=["instances"])
async def list_instances(
    all: bool = Query(default=False, description="include terminated instances"),
    ctx: ServerContext = Depends(get_ctx),
) -> list[InstanceView]:
    rows = await ctx.db.query(instances.list_instances, include_terminated=all)
    return [instance_view(r) for r in rows]


@router.get("/instances/{ref}", response_model=InstanceView, tags=["instances"])
async def get_instance(ref: str, ctx: ServerContext = Depends(get_ctx)) -> InstanceView:
    rows = await ctx.db.query(instances.list_instances)
    for r in rows:
        if ref in (r["id"], r["name"]):
            return instance_view(r)
    raise ApiError(404, "not_found", f"instance {ref} not found")


@router.get("/events", response_model=list[EventView], tags=["events"])
async def list_events(
    level: str = Query(default="info", description="minimum level: debug, info, warning, error"),
    after: int = Query(default=0, ge=0, le=INT64_MAX, description="only events with id > after"),
    limit: int = Query(default=100, ge=1, le=1000),
    job: int | None = Query(default=None, ge=INT64_MIN, le=INT64_MAX),
    instance: str | None = Query(default=None),
    kind: str | None = Query(default=None),
    wait: float = Query(default=0, ge=0, le=60, description="hold the reply until an event"),
    ctx: ServerContext = Depends(get_ctx),
) -> list[EventView]:
    if level not in events.LEVELS:
        raise ApiError(
            422,
            "invalid_request",
            f"level: must be one of {', '.join(events.LEVELS)}",
            fields=[{"field": "level", "message": "unknown level"}],
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        gen = ctx.notifier.generation(EVENTS_KEY)
        rows = await ctx.db.query(
            events.list_events,
            min_level=level,
            after_id=after,
            limit=limit,
            job_id=job,
            instance_id=instance,
            kind=kind,
            newest=(after == 0 and wait == 0),
        )
        remaining = deadline - loop.time()
        if rows or remaining <= 0:
            return [event_view(r) for r in rows]
        await ctx.notifier.wait(EVENTS_KEY, gen, min(ctx.recheck(remaining), 1.0))


@router.get("/servers", response_model=list[ServerView], tags=["servers"])
async def list_servers(
    all: bool = Query(default=False, description="include servers stopped long ago"),
    ctx: ServerContext = Depends(get_ctx),
) -> list[ServerView]:
    now = ctx.now()
    rows = await ctx.db.query(
        servers.list_servers, include_stopped_since=None if all else now - 3600
    )
    return [server_view(r, now, ctx.config.server_grace) for r in rows]
