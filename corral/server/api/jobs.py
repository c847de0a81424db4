"""Jobs as users see them: submit, list, inspect, follow logs, cancel, requeue."""

from __future__ import annotations

import asyncio
import base64
import json
import re

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from corral.api import JobBatch, JobBatchReply, JobSubmit, JobView, LogChunkView, LogPage
from corral.api.common import INT64_MAX, INT64_MIN
from corral.api.jobs import MAX_BATCH
from corral.domain.jobs import FINAL_JOB_STATES, JobState
from corral.server import metrics
from corral.server.auth import Principal, require_admin
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.leases import instance_key
from corral.server.params import PathInt
from corral.server.views import job_view
from corral.store import jobs as repo
from corral.store import objects

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], dependencies=[Depends(require_admin)])

_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def job_key(job_id: int) -> tuple[str, int]:
    return ("job", job_id)


async def _view(ctx: ServerContext, job_id: int) -> JobView:
    async def q(conn):
        row = await repo.require_job(conn, job_id)
        return job_view(row, await repo.list_attempts(conn, job_id))

    return await ctx.db.query(q)


async def _body(request: Request):
    """The JSON body, read so that bytes which are not UTF-8 inside a string reach the
    model's validators (and get a 422 naming the field) instead of failing the whole
    body."""
    raw = await request.body()
    try:
        data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except ValueError as exc:
        raise ApiError(
            422,
            "invalid_request",
            f"body: not valid JSON ({exc})",
            fields=[{"field": "body", "message": "not valid JSON"}],
        ) from None
    return data


async def submitted(request: Request) -> JobSubmit:
    data = await _body(request)
    try:
        return JobSubmit.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


async def batch_submitted(request: Request) -> JobBatch:
    data = await _body(request)
    try:
        return JobBatch.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


async def _check_objects(ctx: ServerContext, specs: list[JobSubmit]) -> None:
    """Every object a job names (inputs, workdir) must be known and held somewhere."""
    for field, refs, hint in (
        ("inputs", sorted({r for s in specs for r in s.inputs}), "upload it with corral put"),
        (
            "workdir",
            sorted({s.workdir for s in specs if s.workdir}),
            "upload it again: corral run -w",
        ),
    ):
        missing = await ctx.db.query(objects.unavailable, refs) if refs else []
        if missing:
            raise ApiError(
                422,
                "invalid_request",
                f"{field}: object {missing[0]} is unknown or lost ({hint})",
                fields=[{"field": field, "message": f"unknown object {m}"} for m in missing],
            )


@router.post(
    "",
    status_code=201,
    response_model=JobView,
    summary="Submit a job",
    responses={
        200: {"model": JobView, "description": "a retry: the job its Idempotency-Key made"},
        409: {"description": "the Idempotency-Key was used for another request"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": JobSubmit.model_json_schema()}},
        }
    },
)
async def submit(
    response: Response,
    spec: JobSubmit = Depends(submitted),
    idempotency_key: str | None = Header(
        default=None,
        description="a key the client picks per job (printable ASCII, at most 200 "
        "characters): a retry with the same key and body returns the first job (200) "
        "instead of creating another; another body under the same key is a 409",
    ),
    who: Principal = Depends(require_admin),
    ctx: ServerContext = Depends(get_ctx),
) -> JobView:
    await _check_objects(ctx, [spec])
    if idempotency_key is None:
        row = await ctx.db.transact(repo.submit_row, spec, ctx.now())
    else:
        if not _KEY.match(idempotency_key):
            raise ApiError(
                422,
                "invalid_request",
                "Idempotency-Key: 1 to 200 printable ASCII characters",
                fields=[{"field": "Idempotency-Key", "message": "1 to 200 printable ASCII"}],
            )
        try:
            job_id, created = await ctx.db.transact(
                repo.submit_once, spec, ctx.now(), who.token_id, idempotency_key
            )
        except repo.IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", str(exc)) from None
        if created is None:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
            return await _view(ctx, job_id)  # as it is now: it may have run since
        row = created
    metrics.JOBS_SUBMITTED.labels(spec.fleet or "").inc()
    ctx.notifier.wake("dispatch")
    return job_view(row)  # as it went in: a new job has no attempt yet


@router.post(
    ":batch",
    status_code=201,
    response_model=JobBatchReply,
    summary="Submit many jobs in one request and one transaction (all or none)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "jobs": {
                                "type": "array",
                                "items": JobSubmit.model_json_schema(),
                                "minItems": 1,
                                "maxItems": MAX_BATCH,
                            }
                        },
                        "required": ["jobs"],
                        "additionalProperties": False,
                    }
                }
            },
        }
    },
)
async def submit_batch(
    batch: JobBatch = Depends(batch_submitted), ctx: ServerContext = Depends(get_ctx)
) -> JobBatchReply:
    await _check_objects(ctx, batch.jobs)
    ids = await ctx.db.transact(repo.submit_many, batch.jobs, ctx.now())
    for spec in batch.jobs:
        metrics.JOBS_SUBMITTED.labels(spec.fleet or "").inc()
    ctx.notifier.wake("dispatch")
    return JobBatchReply(ids=ids)


@router.get("", response_model=list[JobView], summary="List jobs, newest first")
async def list_jobs(
    state: list[JobState] | None = Query(default=None, description="filter by state (repeatable)"),
    limit: int = Query(default=100, ge=1, le=5000),
    before: int | None = Query(
        default=None, ge=INT64_MIN, le=INT64_MAX, description="only jobs with id < before"
    ),
    ctx: ServerContext = Depends(get_ctx),
) -> list[JobView]:
    rows = await ctx.db.query(
        repo.list_jobs,
        states=[x.value for x in state] if state else None,
        limit=limit,
        before_id=before,
    )
    return [job_view(r) for r in rows]


@router.get("/{job_id}", response_model=JobView, summary="One job with its attempts")
async def get_job(job_id: PathInt, ctx: ServerContext = Depends(get_ctx)) -> JobView:
    return await _view(ctx, job_id)


@router.post("/{job_id}/cancel", response_model=JobView, summary="Cancel; kills its processes")
async def cancel(job_id: PathInt, ctx: ServerContext = Depends(get_ctx)) -> JobView:
    row = await ctx.db.transact(repo.cancel, job_id, ctx.now())
    ctx.notifier.wake(job_key(job_id), "dispatch")
    if row["instance_id"]:
        ctx.notifier.wake(instance_key(row["instance_id"]))
    return await _view(ctx, job_id)


@router.post(
    "/{job_id}/requeue",
    response_model=JobView,
    summary="Revoke the current attempt and queue the job again (counts as an attempt)",
)
async def requeue(job_id: PathInt, ctx: ServerContext = Depends(get_ctx)) -> JobView:
    before = await _view(ctx, job_id)
    await ctx.db.transact(repo.requeue, job_id, ctx.now(), "requested by user")
    ctx.notifier.wake(job_key(job_id), "dispatch")
    if before.instance_id:
        ctx.notifier.wake(instance_key(before.instance_id))
    return await _view(ctx, job_id)


@router.get("/{job_id}/logs", response_model=LogPage, summary="Read or follow a job's logs")
async def logs(
    job_id: PathInt,
    attempt: int | None = Query(
        default=None, ge=1, le=INT64_MAX, description="default: the current attempt"
    ),
    after: int = Query(
        default=-1, ge=-1, le=INT64_MAX, description="return chunks with seq > after"
    ),
    wait: float = Query(default=0, ge=0, le=60, description="hold the reply until new output"),
    limit: int = Query(default=500, ge=1, le=5000),
    ctx: ServerContext = Depends(get_ctx),
) -> LogPage:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    key = job_key(job_id)
    n = attempt
    while True:
        gen = ctx.notifier.generation(key)

        async def page(conn, n=n):
            job = await repo.require_job(conn, job_id)
            n = n or job["current_attempt"]
            chunks = await repo.read_logs(conn, job_id, n, after, limit) if n else []
            return job, n, chunks

        job, n, chunks = await ctx.db.query(page)
        remaining = deadline - loop.time()
        moved_on = n != job["current_attempt"]  # a newer attempt exists (or this one's gone)
        if chunks or moved_on or job["state"] in FINAL_JOB_STATES or remaining <= 0:
            return LogPage(
                job_id=job_id,
                attempt=n,
                chunks=[
                    LogChunkView(
                        seq=c["seq"], stream=c["stream"], data=base64.b64encode(c["data"]).decode()
                    )
                    for c in chunks
                ],
                next_seq=chunks[-1]["seq"] if chunks else after,
                job_state=job["state"],
                current_attempt=job["current_attempt"],
                exit_code=job["exit_code"],
                reason=job["reason"],
            )
        if n == 0:
            n = None  # not started yet: pick the attempt up once there is one
        await ctx.notifier.wait(key, gen, ctx.recheck(remaining))
