"""Outputs and uploads: list, download (streamed from an instance holding a replica),
upload (`corral put`), and the peer-token check agents make before serving data."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import httpx
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from corral.api import CopiesLanded, ObjectView, OutputView, PeerVerify, ReplicaView
from corral.server import uploads
from corral.server.auth import Principal, require_admin, require_agent
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import body_limit
from corral.server.leases import instance_key
from corral.server.loops.drainer import announce
from corral.server.params import PathInt, PathSha256
from corral.store import drain as drain_repo
from corral.store import jobs as jobs_repo
from corral.store import objects as repo

log = logging.getLogger("corral.server")
router = APIRouter(prefix="/api/v1", tags=["outputs"])
admin = [Depends(require_admin)]
PEER_TOKEN_HEADER = "X-Corral-Peer-Token"
PEER_RECIPIENT_HEADER = "X-Corral-Peer-Recipient"  # the instance a token was issued to
MAX_UPLOAD = 64 * 2**30


def staging_dir(ctx: ServerContext) -> Path:
    d = ctx.config.data_dir / "staging"
    d.mkdir(parents=True, exist_ok=True)
    return d


async def object_view(ctx: ServerContext, sha256: str) -> ObjectView:
    async def q(conn):
        return await repo.get_object(conn, sha256), await repo.object_replicas(conn, sha256)

    obj, reps = await ctx.db.query(q)
    if obj is None:
        raise ApiError(404, "not_found", f"object {sha256} not found")
    return ObjectView(
        sha256=obj["sha256"],
        size=obj["size"],
        name=obj["name"],
        origin=obj["origin"],
        state=obj["state"],
        durable=bool(obj["durable_url"]),
        replicas=[
            ReplicaView(
                instance_id=r["instance_id"],
                instance_name=r["instance_name"],
                instance_state=r["instance_state"],
                state=r["state"],
                created_at=r["created_at"],
            )
            for r in reps
        ],
    )


@router.get("/jobs/{job_id}/outputs", response_model=list[OutputView], dependencies=admin)
async def job_outputs(job_id: PathInt, ctx: ServerContext = Depends(get_ctx)) -> list[OutputView]:
    async def q(conn):
        await jobs_repo.require_job(conn, job_id)
        return await repo.list_outputs(conn, job_id)

    return [
        OutputView(
            path=r["path"],
            sha256=r["sha256"],
            size=r["size"],
            attempt=r["attempt"],
            state=r["state"],
            copies=r["copies"] + (1 if r["durable_url"] else 0),
            durable=bool(r["durable_url"]),
        )
        for r in await ctx.db.query(q)
    ]


@router.get("/objects/{sha256}", response_model=ObjectView, dependencies=admin)
async def get_object(sha256: PathSha256, ctx: ServerContext = Depends(get_ctx)) -> ObjectView:
    uploads.check_sha256(sha256)
    return await object_view(ctx, sha256)


@router.get(
    "/objects/{sha256}/content",
    dependencies=admin,
    summary="Download an object, streamed from an instance that holds it "
    "(or from its fleet's durable store)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def content(sha256: PathSha256, ctx: ServerContext = Depends(get_ctx)):
    uploads.check_sha256(sha256)

    async def plan(conn):
        obj = await repo.get_object(conn, sha256)
        if obj is None:
            return None, []
        # only registered instances' peer endpoints; a token per holder (single-use)
        srcs: list[tuple[str | None, str, str | None]] = [
            (iid, url, await repo.grant(conn, sha256, None, ctx.now()))
            for iid, url in await repo.holders(conn, sha256)
        ]
        if durable := await repo.durable_source(conn, obj, ctx.now()):
            srcs.append((None, durable, None))  # last: the bucket if no instance answers
        return obj, srcs

    obj, srcs = await ctx.db.transact(plan)
    if obj is None:
        raise ApiError(404, "not_found", f"object {sha256} not found")
    headers = {"X-Corral-Sha256": sha256, "Content-Length": str(obj["size"])}
    staged = staging_dir(ctx) / sha256
    if not srcs and staged.exists():
        return FileResponse(staged, headers={"X-Corral-Sha256": sha256})
    client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=300), follow_redirects=False)
    for instance_id, url, token in srcs:
        try:
            req = client.build_request(
                "GET", url, headers={PEER_TOKEN_HEADER: token} if token else {}
            )
            resp = await client.send(req, stream=True)
        except httpx.HTTPError:
            continue
        if resp.status_code != 200:
            await resp.aclose()
            continue
        return StreamingResponse(
            verified(ctx, client, resp, sha256, obj["size"], instance_id),
            headers=headers,
            media_type="application/octet-stream",
        )
    await client.aclose()
    raise ApiError(
        503,
        "unavailable",
        f"no holder of {sha256[:12]}… answered ({len(srcs)} tried); its state is {obj['state']}",
    )


class WrongBytes(Exception):
    pass


async def verified(
    ctx: ServerContext,
    client: httpx.AsyncClient,
    resp: httpx.Response,
    sha256: str,
    size: int,
    instance_id: str | None,
):
    """The source's bytes, hashed as they pass; the last chunk is held back until the
    whole body hashed right, so a client never gets a complete wrong body. On a
    mismatch the stream is aborted (the client sees a body cut short) and that
    replica is marked failed."""
    digest, got, held = hashlib.sha256(), 0, b""
    why = None
    try:
        async for chunk in resp.aiter_bytes(1024 * 1024):
            got += len(chunk)
            if got > size:
                why = f"more than the object's {size} bytes"
                break
            digest.update(chunk)
            if held:
                yield held
            held = chunk
        else:
            if got != size:
                why = f"{got} of {size} bytes"
            elif digest.hexdigest() != sha256:
                why = f"sha256 {digest.hexdigest()[:12]}…"
    finally:
        await resp.aclose()
        await client.aclose()
    if why is None:
        if held:
            yield held
        return
    log.warning("object %s from %s: %s; download aborted", sha256[:12], instance_id, why)
    if instance_id is not None:
        await ctx.db.transact(repo.replica_bad, sha256, instance_id, why, ctx.now())
    raise WrongBytes(f"object {sha256[:12]}… from {instance_id}: {why}")


@router.put(
    "/objects",
    response_model=ObjectView,
    status_code=201,
    dependencies=admin,
    summary="Upload a file as an object; answers once an instance holds it",
)
@body_limit(MAX_UPLOAD)  # streamed to disk, never held in memory
async def put_object(
    request: Request,
    name: str | None = Query(default=None, max_length=1000),
    wait: float = Query(default=60, ge=0, le=600),
    ctx: ServerContext = Depends(get_ctx),
) -> ObjectView:
    sha, size = await uploads.receive(
        request, staging_dir(ctx), MAX_UPLOAD, "upload", allow_empty=True
    )
    target = await ctx.db.transact(repo.stage_upload, sha, size, name, ctx.server_id, ctx.now())
    if target:
        ctx.notifier.wake(instance_key(target))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        view = await object_view(ctx, sha)
        if any(r.state == "present" for r in view.replicas) or loop.time() > deadline:
            return view
        await asyncio.sleep(0.2)


@router.get("/objects/{sha256}/staged", include_in_schema=False)
async def staged(sha256: str, request: Request, ctx: ServerContext = Depends(get_ctx)):
    """An upload not yet on any instance, fetched by the instance it was placed on."""
    uploads.check_sha256(sha256)
    token = request.headers.get(PEER_TOKEN_HEADER, "")
    recipient = request.headers.get(PEER_RECIPIENT_HEADER) or None
    why = await ctx.db.transact(repo.verify_grant, sha256, token, ctx.now(), recipient=recipient)
    if why:
        raise ApiError(403, "forbidden", why)
    path = staging_dir(ctx) / sha256
    if not path.exists():
        raise ApiError(404, "not_found", f"object {sha256} is not staged here")
    return FileResponse(path)


@router.post(
    "/agents/peer/verify",
    tags=["agents"],
    summary="An agent asks whether a peer token lets its bearer fetch an object",
)
async def verify(
    body: PeerVerify, who: Principal = Depends(require_agent), ctx: ServerContext = Depends(get_ctx)
) -> dict:
    why = await ctx.db.transact(
        repo.verify_grant, body.sha256, body.token, ctx.now(), recipient=body.recipient
    )
    if why:
        raise ApiError(403, "forbidden", why)
    return {"ok": True}


@router.post(
    "/agents/copies",
    tags=["agents"],
    summary="An agent reports ordered copies it has fetched and verified, at once",
)
async def copies_landed(
    body: CopiesLanded,
    who: Principal = Depends(require_agent),
    ctx: ServerContext = Depends(get_ctx),
) -> dict:
    """What the agent's next heartbeat would report, without waiting for it. A drain
    step these copies make due (a source whose last copy landed, or one with more to
    order) runs in the same transaction: the source retires now, not on the drain
    loop's next pass."""
    if body.instance_id != who.instance_id:
        raise ApiError(403, "forbidden", "this credential belongs to another instance")
    now = 0.0

    async def land(conn):
        nonlocal now
        now = ctx.now()  # in the transaction: a retirement is stamped when it is decided
        return await drain_repo.copies_landed(
            conn,
            ctx.db,
            body.instance_id,
            body.incarnation,
            body.sha256s,
            now,
            drain_grace=ctx.config.drain_grace,
        )

    landed = await ctx.db.transact(land)
    announce(ctx, landed.steps, now)
    if landed.step_due:
        ctx.notifier.wake("drain")
    return {"present": landed.present}
