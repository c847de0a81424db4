"""Drain instances; fleets: apply a fleet file, scale, list."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from corral.api import DrainRequest, DrainView, FleetSpec, FleetView, ScaleRequest
from corral.domain.instances import InstanceState
from corral.server.auth import require_admin
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.leases import instance_key
from corral.server.views import fleet_views, instance_view
from corral.store import drain, fleets, instances, provisions, scaling

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_admin)])


async def resolve_instance(conn, ref: str):
    row = await instances.get_instance(conn, ref) or await instances.get_by_name(conn, ref)
    if row is None:
        raise ApiError(404, "not_found", f"instance {ref} not found")
    return row


@router.post(
    "/instances/{ref}/drain",
    response_model=DrainView,
    tags=["instances"],
    summary="Drain: no new jobs, copy its unique data away, then retire it",
)
async def drain_instance(
    ref: str, body: DrainRequest | None = None, ctx: ServerContext = Depends(get_ctx)
) -> DrainView:
    force = bool(body and body.force)

    async def go(conn):
        row = await resolve_instance(conn, ref)
        if row["state"] in (InstanceState.RETIRED, InstanceState.TERMINATED):
            raise ApiError(409, "conflict", f"instance {row['name']} is already {row['state']}")
        inst, risk = await drain.request_drain(conn, row["id"], force, ctx.now())
        rows = {r["id"]: r for r in await instances.list_instances(conn)}
        return DrainView(instance=instance_view(rows[inst["id"]]), at_risk=risk)

    view = await ctx.db.transact(go)
    ctx.notifier.wake("drain", "dispatch", instance_key(view.instance.id))
    return view


@router.post("/instances/{ref}/undrain", tags=["instances"], summary="Stop draining")
async def undrain_instance(ref: str, ctx: ServerContext = Depends(get_ctx)):
    async def go(conn):
        row = await resolve_instance(conn, ref)
        if row["state"] != InstanceState.DRAINING:
            raise ApiError(
                409, "conflict", f"instance {row['name']} is {row['state']}, not draining"
            )
        await instances.transition(
            conn, row["id"], InstanceState.RUNNING, ctx.now(), drain_force=False, message=None
        )
        rows = {r["id"]: r for r in await instances.list_instances(conn)}
        return instance_view(rows[row["id"]])

    view = await ctx.db.transact(go)
    ctx.notifier.wake("dispatch", instance_key(view.id))
    return view


@router.get("/fleets", response_model=list[FleetView], tags=["fleets"])
async def list_fleets(ctx: ServerContext = Depends(get_ctx)) -> list[FleetView]:
    return await ctx.db.query(fleet_views)


@router.put(
    "/fleets/{name}",
    response_model=FleetView,
    tags=["fleets"],
    summary="Create or update a fleet (the fleet file)",
)
async def apply_fleet(name: str, spec: FleetSpec, ctx: ServerContext = Depends(get_ctx)):
    if spec.name != name:
        raise ApiError(
            422, "invalid_request", f"name: {spec.name!r} does not match the URL ({name!r})"
        )

    async def go(conn):
        existing = await fleets.get_fleet(conn, name)
        active = (
            len(
                list(
                    await fleets.fleet_instances(
                        conn, name, [InstanceState.PENDING, InstanceState.RUNNING]
                    )
                )
            )
            if existing
            else 0
        )
        target = min(
            spec.max_size,
            max(spec.min_size, existing["target_size"] if existing else spec.min_size),
        )
        await fleets.upsert_fleet(
            conn,
            name=name,
            backend=spec.backend,
            min_size=spec.min_size,
            max_size=spec.max_size,
            target_size=target,
            now=ctx.now(),
            idle_timeout=spec.idle_timeout,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            spec=spec.settings(),
        )
        # a person applied the fleet (perhaps after fixing a host): failed
        # provisioning is tried again, with a fresh count
        await provisions.rearm(conn, name)
        if target < active:
            await scaling.shrink(conn, name, active - target, ctx.now(), "fleet file applied")
        return next(v for v in await fleet_views(conn) if v.name == name)

    view = await ctx.db.transact(go)
    ctx.notifier.wake("fleets", "drain")
    return view


@router.post(
    "/fleets/{name}/scale",
    response_model=FleetView,
    tags=["fleets"],
    summary="Set a fleet's size; shrinking drains the instances with the least unique data first",
)
async def scale_fleet(name: str, body: ScaleRequest, ctx: ServerContext = Depends(get_ctx)):
    async def go(conn):
        f = await fleets.get_fleet(conn, name)
        if f is None:
            raise ApiError(404, "not_found", f"fleet {name} not found")
        if not f["min_size"] <= body.size <= f["max_size"]:
            raise ApiError(
                422,
                "invalid_request",
                f"size: {body.size} is outside fleet {name}'s range "
                f"{f['min_size']}..{f['max_size']} (change it with corral fleet apply)",
                fields=[{"field": "size", "message": "out of range"}],
            )
        await scaling.set_target(conn, name, body.size, ctx.now(), "scaled by user")
        return next(v for v in await fleet_views(conn) if v.name == name)

    view = await ctx.db.transact(go)
    ctx.notifier.wake("fleets", "drain")
    return view
