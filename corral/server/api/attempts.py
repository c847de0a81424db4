"""What runners (and agents on their behalf) send about one attempt, fenced by its token.

Every route here carries the attempt's token in the X-Corral-Attempt-Token header. A
token that is not the job's current one gets 409 and changes nothing, logs included.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from corral.api import AttemptAck, AttemptFinish, AttemptLost, LogBatch
from corral.server import metrics
from corral.server.api.jobs import job_key
from corral.server.auth import attempt_token
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import MiB, attempt_body, body_limit
from corral.server.params import PathInt
from corral.store import jobs as repo

router = APIRouter(prefix="/api/v1/jobs/{job_id}/attempts/{number}", tags=["attempts"])


def _ack(job_id: int, number: int, state: str, recorded: bool = True) -> AttemptAck:
    return AttemptAck(job_id=job_id, attempt=number, job_state=state, recorded=recorded)


@router.post("/start", response_model=AttemptAck, summary="The runner started the command")
@attempt_body
async def start(
    job_id: PathInt,
    number: PathInt,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    started = await ctx.db.transact(repo.record_start, job_id, number, token, ctx.now())
    ctx.issued_tokens.add(job_id, number, token)  # it passed the fence: the guard knows it
    ctx.notifier.wake(job_key(job_id))
    if started.recorded:  # a retried start was counted already
        metrics.ATTEMPTS_STARTED.inc()
    if started.submit_to_start is not None:
        metrics.SUBMIT_TO_START.observe(started.submit_to_start)
    return _ack(job_id, number, started.job_state)


@router.post("/heartbeat", response_model=AttemptAck, summary="The runner is alive")
@attempt_body
async def heartbeat(
    job_id: PathInt,
    number: PathInt,
    token: str = Depends(attempt_token),
    ctx: ServerContext = Depends(get_ctx),
) -> AttemptAck:
    await ctx.db.transact(repo.touch_attempt, job_id, number, token, ctx.now())
    ctx.issued_tokens.add(job_id, number, token)
    return _ack(job_id, number, "running")


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
    try:
        chunks = repo.decode_chunks(batch.chunks)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    await ctx.db.transact(repo.append_logs, job_id, number, token, chunks, ctx.now())
    ctx.notifier.wake(job_key(job_id))
    return _ack(job_id, number, "running")


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
    state = await ctx.db.transact(
        repo.lose_attempt, job_id, number, body.reason, ctx.now(), token=token
    )
    ctx.notifier.wake(job_key(job_id), "dispatch")
    if state:
        metrics.ATTEMPTS_FINISHED.labels("lost").inc()
    return _ack(job_id, number, state or "unchanged")
