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

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ValidationError

from corral.api import AttemptAck, AttemptFinish, AttemptLost, LogBatch
from corral.api.jobs import AttemptReportResult, AttemptReports, AttemptReportsReply
from corral.domain.errors import IllegalTransition, StaleToken
from corral.server import metrics
from corral.server.api.jobs import job_key
from corral.server.auth import attempt_token, require_agent
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError, error_body
from corral.server.guard import MiB, attempt_body, body_limit
from corral.server.params import PathInt
from corral.store import jobs as repo
from corral.store.db import DatabaseConflict

router = APIRouter(prefix="/api/v1/jobs/{job_id}/attempts/{number}", tags=["attempts"])
relay_router = APIRouter(prefix="/api/v1/agents", tags=["agents"])


def _ack(job_id: int, number: int, state: str, recorded: bool = True) -> AttemptAck:
    return AttemptAck(job_id=job_id, attempt=number, job_state=state, recorded=recorded)


# -- what each report does (the routes and the relay share these) ------------------------------


async def do_start(ctx: ServerContext, job_id: int, number: int, token: str) -> AttemptAck:
    started = await ctx.db.transact(repo.record_start, job_id, number, token, ctx.now())
    ctx.issued_tokens.add(job_id, number, token)  # it passed the fence: the guard knows it
    ctx.notifier.wake(job_key(job_id))
    if started.recorded:  # a retried start was counted already
        metrics.ATTEMPTS_STARTED.inc()
    if started.submit_to_start is not None:
        metrics.SUBMIT_TO_START.observe(started.submit_to_start)
    return _ack(job_id, number, started.job_state)


async def do_heartbeat(ctx: ServerContext, job_id: int, number: int, token: str) -> AttemptAck:
    await ctx.db.transact(repo.touch_attempt, job_id, number, token, ctx.now())
    ctx.issued_tokens.add(job_id, number, token)
    return _ack(job_id, number, "running")


async def do_logs(
    ctx: ServerContext, job_id: int, number: int, token: str, batch: LogBatch
) -> AttemptAck:
    try:
        chunks = repo.decode_chunks(batch.chunks)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    await ctx.db.transact(repo.append_logs, job_id, number, token, chunks, ctx.now())
    ctx.notifier.wake(job_key(job_id))
    return _ack(job_id, number, "running")


async def do_finish(
    ctx: ServerContext, job_id: int, number: int, token: str, body: AttemptFinish
) -> AttemptAck:
    try:
        chunks = repo.decode_chunks(body.chunks)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    state, recorded = await ctx.db.transact(
        repo.finish_attempt,
        job_id,
        number,
        token,
        body.exit_code,
        body.reason,
        ctx.now(),
        body.outputs,
        body.model_dump(include={"cpu_seconds", "peak_memory_mb", "limits_enforced", "notes"}),
        chunks,
    )
    ctx.notifier.wake(job_key(job_id), "dispatch")
    if recorded:
        outcome = "succeeded" if body.exit_code == 0 else "failed"
        metrics.ATTEMPTS_FINISHED.labels(outcome).inc()
    return _ack(job_id, number, state, recorded)


async def do_lost(
    ctx: ServerContext, job_id: int, number: int, token: str, body: AttemptLost
) -> AttemptAck:
    state = await ctx.db.transact(
        repo.lose_attempt, job_id, number, body.reason, ctx.now(), token=token
    )
    ctx.notifier.wake(job_key(job_id), "dispatch")
    if state:
        metrics.ATTEMPTS_FINISHED.labels("lost").inc()
    return _ack(job_id, number, state or "unchanged")


# -- the runner's routes -------------------------------------------------------------------------


@router.post("/start", response_model=AttemptAck, summary="The runner started the command")
@attempt_body
async def start(
    job_id: PathInt,
    number: PathInt,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await do_start(ctx, job_id, number, token)


@router.post("/heartbeat", response_model=AttemptAck, summary="The runner is alive")
@attempt_body
async def heartbeat(
    job_id: PathInt,
    number: PathInt,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    return await do_heartbeat(ctx, job_id, number, token)


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
    return await do_logs(ctx, job_id, number, token, batch)


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
    return await do_finish(ctx, job_id, number, token, body)


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
    return await do_lost(ctx, job_id, number, token, body)


# -- the agent's relay -------------------------------------------------------------------------

Action = Callable[[ServerContext, int, int, str, Any], Awaitable[AttemptAck]]

# action -> (the body's model or None, what it does)
ACTIONS: dict[str, tuple[type[BaseModel] | None, Action]] = {
    "start": (None, lambda ctx, j, n, t, _b: do_start(ctx, j, n, t)),
    "heartbeat": (None, lambda ctx, j, n, t, _b: do_heartbeat(ctx, j, n, t)),
    "logs": (LogBatch, do_logs),
    "finish": (AttemptFinish, do_finish),
    "lost": (AttemptLost, do_lost),
}


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


async def _one(ctx: ServerContext, report) -> tuple[int, dict]:
    """(status, body) exactly as the report's own route answers, but a database that
    does not answer, which fails the whole request (503: the agent sends it again)."""
    model, act = ACTIONS[report.action]
    try:
        body = None
        if model is not None:
            body = model.model_validate(report.body if report.body is not None else {})
        elif report.body:
            return 422, error_body("invalid_request", f"{report.action} takes no body")
        ack = await act(ctx, report.job_id, report.attempt, report.token, body)
    except ValidationError as exc:
        return _invalid(exc)
    except ApiError as exc:
        return exc.status, error_body(exc.code, exc.message, **exc.extra)
    except StaleToken as exc:
        return 409, error_body("stale_token", str(exc))
    except repo.JobNotFound as exc:
        return 404, error_body("not_found", f"job {exc.args[0]} not found")
    except (repo.JobConflict, IllegalTransition) as exc:
        return 409, error_body("conflict", str(exc))
    except DatabaseConflict:
        return 409, error_body("conflict", "the request conflicts with what is stored")
    return 200, ack.model_dump(mode="json")


@relay_router.post(
    "/attempts",
    response_model=AttemptReportsReply,
    summary="An agent relays its runners' attempt reports, many in one request",
    dependencies=[Depends(require_agent)],
)
@body_limit(8 * MiB)  # the relay sends ~4 MiB at most (a report over 1 MiB goes direct)
async def relayed(
    body: AttemptReports,
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptReportsReply:
    """Each report is handled as its own route would handle it, in order, each in its own
    transaction: one report's 409 does not undo another's start."""
    results = []
    for report in body.reports:
        status, answer = await _one(ctx, report)
        results.append(AttemptReportResult(status=status, body=answer))
    metrics.RELAYED_REPORTS.inc(len(body.reports))
    return AttemptReportsReply(results=results)
