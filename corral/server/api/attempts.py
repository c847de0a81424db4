"""What runners (and agents on their behalf) send about one attempt, fenced by its token.

Every route under /api/v1/jobs/{job_id}/attempts/{number} carries the attempt's token in
the X-Corral-Attempt-Token header. A token that is not the job's current one gets 409
and changes nothing, logs included.

An agent may relay its runners' reports, many in one request
(POST /api/v1/agents/attempts): each report carries its own attempt token and gets
exactly what its own route would have answered. The relay adds no authority: a report
is fenced by its token, not by the agent's credential.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ValidationError

from corral.api import AttemptAck, AttemptFinish, AttemptLost, LogBatch
from corral.api.jobs import (
    AttemptReport,
    AttemptReportResult,
    AttemptReports,
    AttemptReportsReply,
)
from corral.domain.errors import StaleToken
from corral.server import metrics
from corral.server.api.jobs import job_key
from corral.server.auth import attempt_token, require_agent
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError, error_body
from corral.server.guard import MiB, attempt_body, body_limit
from corral.server.params import PathInt
from corral.store import jobs as repo
from corral.store.db import DatabaseConflict
from corral.store.jobs import Report

router = APIRouter(prefix="/api/v1/jobs/{job_id}/attempts/{number}", tags=["attempts"])
relay_router = APIRouter(prefix="/api/v1/agents", tags=["agents"])


def _ack(job_id: int, number: int, state: str, recorded: bool = True) -> AttemptAck:
    return AttemptAck(job_id=job_id, attempt=number, job_state=state, recorded=recorded)


# -- what each report does (the routes and the relay share these) ------------------------------


def prepared(action: str, job_id: int, number: int, token: str, body: Any = None) -> Report:
    chunks = None
    if action in ("logs", "finish"):
        try:
            chunks = repo.decode_chunks(body.chunks)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
    return Report(action, job_id, number, token, body, chunks)


def after(ctx: ServerContext, r: Report, value: Any) -> AttemptAck:
    """Once its transaction committed: wake-ups, metrics, and the route's answer."""
    if r.action == "start":
        ctx.issued_tokens.add(r.job_id, r.number, r.token)  # it passed the fence
        ctx.notifier.wake(job_key(r.job_id))
        if value.recorded:  # a retried start was counted already
            metrics.ATTEMPTS_STARTED.inc()
        if value.submit_to_start is not None:
            metrics.SUBMIT_TO_START.observe(value.submit_to_start)
        return _ack(r.job_id, r.number, value.job_state)
    if r.action == "heartbeat":
        ctx.issued_tokens.add(r.job_id, r.number, r.token)
        return _ack(r.job_id, r.number, "running")
    if r.action == "logs":
        ctx.notifier.wake(job_key(r.job_id))
        return _ack(r.job_id, r.number, "running")
    ctx.notifier.wake(job_key(r.job_id), "dispatch")
    if r.action == "finish":
        state, recorded = value
        if recorded:
            outcome = "succeeded" if r.body.exit_code == 0 else "failed"
            metrics.ATTEMPTS_FINISHED.labels(outcome).inc()
        return _ack(r.job_id, r.number, state, recorded)
    if value:
        metrics.ATTEMPTS_FINISHED.labels("lost").inc()
    return _ack(r.job_id, r.number, value or "unchanged")


async def handle(ctx: ServerContext, r: Report) -> AttemptAck:
    """One report in its own transaction (the runner's own routes)."""
    value = await ctx.db.transact(repo.apply_report, r, ctx.now())
    return after(ctx, r, value)


# -- the runner's routes -------------------------------------------------------------------------


@router.post("/start", response_model=AttemptAck, summary="The runner started the command")
@attempt_body
async def start(
    job_id: PathInt,
    number: PathInt,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await handle(ctx, prepared("start", job_id, number, token))


@router.post("/heartbeat", response_model=AttemptAck, summary="The runner is alive")
@attempt_body
async def heartbeat(
    job_id: PathInt,
    number: PathInt,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await handle(ctx, prepared("heartbeat", job_id, number, token))


@router.post("/logs", response_model=AttemptAck, summary="Append log chunks (idempotent by seq)")
@attempt_body
@body_limit(4 * MiB)  # a runner's batch is at most ~0.6 MB of output, base64
async def logs(
    job_id: PathInt,
    number: PathInt,
    batch: LogBatch,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await handle(ctx, prepared("logs", job_id, number, token, batch))


@router.post(
    "/finish",
    response_model=AttemptAck,
    summary="The command exited (with its last log chunks, if any)",
)
@attempt_body
@body_limit(32 * MiB)  # up to 100,000 outputs
async def finish(
    job_id: PathInt,
    number: PathInt,
    body: AttemptFinish,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await handle(ctx, prepared("finish", job_id, number, token, body))


@router.post(
    "/lost",
    response_model=AttemptAck,
    summary="The attempt ended without a result (runner died, could not start)",
)
@attempt_body
async def lost(
    job_id: PathInt,
    number: PathInt,
    body: AttemptLost,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await handle(ctx, prepared("lost", job_id, number, token, body))


# -- the agent's relay -------------------------------------------------------------------------

BODIES: dict[str, type[BaseModel] | None] = {
    "start": None,
    "heartbeat": None,
    "logs": LogBatch,
    "finish": AttemptFinish,
    "lost": AttemptLost,
}
TRANSACTION_REPORTS = 64  # reports per transaction: the write lock is not held long


def _invalid(exc: ValidationError) -> tuple[int, dict]:
    fields = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ())) or "body",
            "message": e.get("msg", "invalid"),
        }
        for e in exc.errors()
    ]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return 422, error_body("invalid_request", summary or "invalid body", fields=fields)


def _refusal(exc: Exception) -> tuple[int, dict]:
    """(status, body) as the report's own route answers this error."""
    if isinstance(exc, ApiError):
        return exc.status, error_body(exc.code, exc.message, **exc.extra)
    if isinstance(exc, StaleToken):
        return 409, error_body("stale_token", str(exc))
    if isinstance(exc, repo.JobNotFound):
        return 404, error_body("not_found", f"job {exc.args[0]} not found")
    if isinstance(exc, DatabaseConflict):
        return 409, error_body("conflict", "the request conflicts with what is stored")
    return 409, error_body("conflict", str(exc))


def _check(report: AttemptReport) -> Report | tuple[int, dict]:
    """The report ready for its transaction, or the 422 its route would answer."""
    model = BODIES[report.action]
    try:
        body = None
        if model is not None:
            body = model.model_validate(report.body if report.body is not None else {})
        elif report.body:
            return 422, error_body("invalid_request", f"{report.action} takes no body")
        return prepared(report.action, report.job_id, report.attempt, report.token, body)
    except ValidationError as exc:
        return _invalid(exc)
    except ApiError as exc:
        return _refusal(exc)


async def _apply(ctx: ServerContext, reports: list[Report]) -> list[tuple[bool, Any]]:
    """(True, value) or (False, what refused it) per report. All in one transaction;
    when one is refused (a stale token: rare), that transaction writes nothing and each
    report gets a transaction of its own, so one report's 409 undoes no other's start."""
    now = ctx.now()
    try:
        return [(True, v) for v in await ctx.db.transact(repo.apply_reports, reports, now)]
    except repo.REFUSED:
        pass
    out: list[tuple[bool, Any]] = []
    for r in reports:
        try:
            out.append((True, await ctx.db.transact(repo.apply_report, r, now)))
        except repo.REFUSED as exc:
            out.append((False, exc))
    return out


@relay_router.post(
    "/attempts",
    response_model=AttemptReportsReply,
    summary="An agent relays its runners' attempt reports, many in one request",
    dependencies=[Depends(require_agent)],
)
@body_limit(8 * MiB)  # the relay sends ~4 MiB at most (a report over 1 MiB goes direct)
async def relayed(
    body: AttemptReports, ctx: ServerContext = Depends(get_ctx)
) -> AttemptReportsReply:
    """Each report is answered as its own route would answer it, in order; their writes
    share one transaction unless one is refused."""
    answers: list[tuple[int, dict] | None] = []
    ready: list[tuple[int, Report]] = []
    for k, report in enumerate(body.reports):
        checked = _check(report)
        if isinstance(checked, Report):
            ready.append((k, checked))
            answers.append(None)
        else:
            answers.append(checked)
    for i in range(0, len(ready), TRANSACTION_REPORTS):
        chunk = ready[i : i + TRANSACTION_REPORTS]
        stored = await _apply(ctx, [r for _k, r in chunk])
        for (k, r), (ok, value) in zip(chunk, stored, strict=True):
            answers[k] = (
                (200, after(ctx, r, value).model_dump(mode="json")) if ok else _refusal(value)
            )
    for report in body.reports:
        metrics.RELAYED_REPORTS.labels(report.action).inc()
    return AttemptReportsReply(
        results=[AttemptReportResult(status=s, body=b) for s, b in filter(None, answers)]
    )
