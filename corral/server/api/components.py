"""Components (artifacts with versions), rollouts, and artifacts the server stores."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response

from corral.api import (
    ComponentPublish,
    ComponentView,
    InstanceComponentView,
    RolloutRequest,
    RolloutView,
)
from corral.domain.reconcile import InstallPolicy
from corral.server import uploads
from corral.server.auth import require_admin, require_joiner
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import body_limit
from corral.server.params import PathInt, PathSha256
from corral.server.views import rollout_view
from corral.store import components as repo

router = APIRouter(prefix="/api/v1", tags=["components"])
admin = [Depends(require_admin)]
MAX_ARTIFACT = 8 * 2**30


def install_policy(ctx: ServerContext) -> InstallPolicy:
    return ctx.install_policy


def component_view(r) -> ComponentView:
    return ComponentView(
        name=r["name"],
        version=r["version"],
        scheme=r["scheme"],
        url=r["url"],
        sha256=r["sha256"],
        size=r["size"],
        created_at=r["created_at"],
    )


async def _run(ctx: ServerContext, fn, *args):
    try:
        return await ctx.db.transact(fn, *args)
    except repo.ComponentError as exc:
        raise ApiError(
            exc.status, "conflict" if exc.status == 409 else "not_found", exc.message
        ) from None


@router.get("/components", response_model=list[ComponentView], dependencies=admin)
async def list_components(ctx: ServerContext = Depends(get_ctx)) -> list[ComponentView]:
    return [component_view(r) for r in await ctx.db.query(repo.list_components)]


@router.post(
    "/components",
    response_model=ComponentView,
    status_code=201,
    dependencies=admin,
    summary="Publish a component version (an artifact URL and its sha256)",
)
async def publish(spec: ComponentPublish, ctx: ServerContext = Depends(get_ctx)) -> ComponentView:
    return component_view(await _run(ctx, repo.publish, spec, ctx.now()))


@router.get(
    "/components/status",
    response_model=list[InstanceComponentView],
    dependencies=admin,
    summary="Per instance: observed and target versions",
)
async def status(
    component: str | None = Query(default=None), ctx: ServerContext = Depends(get_ctx)
) -> list[InstanceComponentView]:
    rows = await ctx.db.query(repo.instance_status, component)
    return [
        InstanceComponentView(
            instance_id=r["instance_id"],
            instance_name=r["instance_name"],
            component=r["component"],
            observed_version=r["observed_version"],
            observed_sha256=r["observed_sha256"],
            target_version=r["target_version"],
            state=r["state"],
            attempts=r["attempts"],
            orders_total=r["orders_total"],
            last_error=r["last_error"],
        )
        for r in rows
    ]


@router.post(
    "/rollouts",
    response_model=RolloutView,
    status_code=201,
    dependencies=admin,
    summary="Set the desired version of a component for a fleet (or all)",
)
async def start_rollout(req: RolloutRequest, ctx: ServerContext = Depends(get_ctx)) -> RolloutView:
    async def go(conn):
        return await rollout_view(conn, await repo.start_rollout(conn, req, ctx.now()))

    view = await _run(ctx, go)
    ctx.notifier.wake("reconcile")
    return view


@router.get("/rollouts", response_model=list[RolloutView], dependencies=admin)
async def list_rollouts(
    limit: int = Query(default=50, ge=1, le=1000), ctx: ServerContext = Depends(get_ctx)
) -> list[RolloutView]:
    async def q(conn):
        return [await rollout_view(conn, r) for r in await repo.list_rollouts(conn, limit)]

    return await ctx.db.query(q)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutView, dependencies=admin)
async def resume(rollout_id: PathInt, ctx: ServerContext = Depends(get_ctx)) -> RolloutView:
    async def go(conn):
        return await rollout_view(conn, await repo.resume(conn, rollout_id, ctx.now()))

    view = await _run(ctx, go)
    ctx.notifier.wake("reconcile")
    return view


@router.post(
    "/rollouts/rollback",
    response_model=RolloutView,
    dependencies=admin,
    summary="Return a component to the version before its last rollout",
)
async def rollback(
    component: str = Query(...),
    fleet: str | None = Query(default=None),
    ctx: ServerContext = Depends(get_ctx),
) -> RolloutView:
    async def go(conn):
        return await rollout_view(conn, await repo.rollback(conn, component, fleet, ctx.now()))

    view = await _run(ctx, go)
    ctx.notifier.wake("reconcile")
    return view


# ---- artifacts stored by the server ---------------------------------------------------------


def artifacts_dir(ctx: ServerContext) -> Path:
    d = ctx.config.data_dir / "artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


@router.put("/artifacts", dependencies=admin, summary="Upload an artifact; returns its sha256")
@body_limit(MAX_ARTIFACT)  # streamed to disk, never held in memory
async def upload(request: Request, ctx: ServerContext = Depends(get_ctx)) -> dict:
    sha, size = await uploads.receive(request, artifacts_dir(ctx), MAX_ARTIFACT, "artifact")
    return {"sha256": sha, "size": size, "url": f"{ctx.config.url}/api/v1/artifacts/{sha}"}


@router.get(
    "/artifacts/{sha256}",
    dependencies=[Depends(require_joiner)],
    summary="Download an artifact (ETag is its sha256; If-None-Match gets 304)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        304: {"description": "Not modified (If-None-Match matched)"},
    },
)
async def download(sha256: PathSha256, request: Request, ctx: ServerContext = Depends(get_ctx)):
    uploads.check_sha256(sha256)
    path = artifacts_dir(ctx) / sha256
    if not path.exists():
        raise ApiError(404, "not_found", f"artifact {sha256} not found")
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/octet-stream", headers={"ETag": etag})
