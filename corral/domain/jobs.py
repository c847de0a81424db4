"""Job and attempt state machines.

A job moves through one table of allowed transitions; the store refuses anything
else. Every lock creates a new attempt with a new fencing token; only the job's
current attempt may change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from corral.domain.errors import IllegalTransition


class JobState(StrEnum):
    QUEUED = "queued"
    LOCKED = "locked"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_JOB_STATES = frozenset({JobState.LOCKED, JobState.RUNNING})

# The one table of allowed job transitions.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.LOCKED, JobState.FAILED, JobState.CANCELLED}),
    JobState.LOCKED: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def job_sources(target: JobState) -> frozenset[JobState]:
    """Every state from which `target` may be entered (used in `UPDATE ... WHERE state IN`)."""
    return frozenset(s for s, targets in JOB_TRANSITIONS.items() if target in targets)


def check_job_transition(current: JobState | str, target: JobState | str) -> None:
    current, target = JobState(current), JobState(target)
    if target not in JOB_TRANSITIONS[current]:
        raise IllegalTransition("job", current, target)


class AttemptState(StrEnum):
    ISSUED = "issued"  # locked: placed on an instance, not yet started
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # the command exited 0
    FAILED = "failed"  # the command exited non-zero or could not start
    LOST = "lost"  # the runner or its instance went away; the job may be retried
    REVOKED = "revoked"  # requeued or cancelled by the control plane; token no longer valid


LIVE_ATTEMPT_STATES = frozenset({AttemptState.ISSUED, AttemptState.RUNNING})

ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.ISSUED: frozenset(
        {AttemptState.RUNNING, AttemptState.REVOKED, AttemptState.LOST, AttemptState.FAILED}
    ),
    AttemptState.RUNNING: frozenset(
        {AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.LOST, AttemptState.REVOKED}
    ),
    AttemptState.SUCCEEDED: frozenset(),
    AttemptState.FAILED: frozenset(),
    AttemptState.LOST: frozenset(),
    AttemptState.REVOKED: frozenset(),
}


def attempt_sources(target: AttemptState) -> frozenset[AttemptState]:
    return frozenset(s for s, targets in ATTEMPT_TRANSITIONS.items() if target in targets)


def check_attempt_transition(current: AttemptState | str, target: AttemptState | str) -> None:
    current, target = AttemptState(current), AttemptState(target)
    if target not in ATTEMPT_TRANSITIONS[current]:
        raise IllegalTransition("attempt", current, target)


@dataclass(frozen=True)
class Outcome:
    """What happens to a job when its current attempt ends without the command finishing."""

    job_state: JobState
    reason: str | None


def after_lost_attempt(attempts_used: int, max_attempts: int, why: str) -> Outcome:
    """A lost attempt (instance gone, runner crashed, never started) requeues the job
    while attempts remain; the last one fails it with a reason that says so."""
    if attempts_used < max_attempts:
        return Outcome(JobState.QUEUED, None)
    return Outcome(
        JobState.FAILED,
        f"gave up after {attempts_used} attempt{'s' if attempts_used != 1 else ''} "
        f"(max_attempts={max_attempts}); last attempt: {why}",
    )


def after_command_exit(exit_code: int) -> JobState:
    """The command ran to completion: its exit code is the job's result, no retry."""
    return JobState.SUCCEEDED if exit_code == 0 else JobState.FAILED
