"""Instance lifecycle: identity, incarnation and the one-way road to retirement.

pending -> running -> draining -> retired -> terminated. A retired or terminated
instance never comes back: its heartbeats are answered `exit`, it gets no job and
no replica. Reachability (lost or not) is tracked apart from this state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from corral.domain.errors import IllegalTransition


class InstanceState(StrEnum):
    PENDING = "pending"  # the backend created it; its agent has not registered yet
    RUNNING = "running"
    DRAINING = "draining"  # no new jobs, not a replica recipient; its data is moving out
    RETIRED = "retired"  # holds nothing anyone needs; its agent has been told to exit
    TERMINATED = "terminated"  # the backend destroyed it


INSTANCE_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.PENDING: frozenset(
        {InstanceState.RUNNING, InstanceState.DRAINING, InstanceState.TERMINATED}
    ),
    InstanceState.RUNNING: frozenset({InstanceState.DRAINING}),
    InstanceState.DRAINING: frozenset({InstanceState.RUNNING, InstanceState.RETIRED}),
    InstanceState.RETIRED: frozenset({InstanceState.TERMINATED}),
    InstanceState.TERMINATED: frozenset(),
}

GONE_STATES = frozenset({InstanceState.RETIRED, InstanceState.TERMINATED})


def instance_sources(target: InstanceState) -> frozenset[InstanceState]:
    return frozenset(s for s, targets in INSTANCE_TRANSITIONS.items() if target in targets)


def check_instance_transition(current: InstanceState | str, target: InstanceState | str) -> None:
    current, target = InstanceState(current), InstanceState(target)
    if target not in INSTANCE_TRANSITIONS[current]:
        raise IllegalTransition("instance", current, target)


class Admission(StrEnum):
    """How the server answers an agent that registers or heartbeats."""

    WELCOME = "welcome"
    EXIT = "exit"


@dataclass(frozen=True)
class RegisterDecision:
    admission: Admission
    reason: str
    state_after: InstanceState | None


def decide_register(state: InstanceState | str | None) -> RegisterDecision:
    """An agent (re)registers. An unknown id or a retired instance is told to exit:
    it is never welcomed back as a new worker."""
    if state is None:
        return RegisterDecision(Admission.EXIT, "unknown instance", None)
    state = InstanceState(state)
    if state in GONE_STATES:
        return RegisterDecision(Admission.EXIT, f"instance is {state}", None)
    if state is InstanceState.PENDING:
        return RegisterDecision(Admission.WELCOME, "registered", InstanceState.RUNNING)
    # running stays running; draining stays draining (a restart does not undo a drain)
    return RegisterDecision(Admission.WELCOME, "re-registered", state)


def decide_heartbeat(
    state: InstanceState | str | None, incarnation: int | None, reported_incarnation: int
) -> RegisterDecision:
    """A heartbeat from a retired, unknown or superseded agent process is answered `exit`."""
    if state is None:
        return RegisterDecision(Admission.EXIT, "unknown instance", None)
    state = InstanceState(state)
    if state in GONE_STATES:
        return RegisterDecision(Admission.EXIT, f"instance is {state}", None)
    if incarnation is not None and reported_incarnation != incarnation:
        return RegisterDecision(
            Admission.EXIT,
            f"incarnation {reported_incarnation} superseded by {incarnation}",
            None,
        )
    return RegisterDecision(Admission.WELCOME, "ok", state)


def superseded(exit_reason: str) -> bool:
    """Does this `exit` answer to a heartbeat say another process of the instance
    registered since (a newer incarnation), rather than that the instance is gone?"""
    return " superseded by " in exit_reason


def accepts_jobs(state: InstanceState | str, lost: bool) -> bool:
    return InstanceState(state) is InstanceState.RUNNING and not lost


def accepts_replicas(state: InstanceState | str, lost: bool) -> bool:
    """Only a running, reachable instance may receive another instance's data."""
    return InstanceState(state) is InstanceState.RUNNING and not lost


# An agent told to exit (retired, unknown, superseded) writes this file in its data
# dir and exits with this code; supervisors (local backend, systemd unit) must not
# restart it.
AGENT_EXIT_RETIRED = 3
# An agent process another process of the same instance superseded (a newer
# incarnation registered) exits with this code, leaving its jobs and data dir alone:
# they belong to the live incarnation now.
AGENT_EXIT_SUPERSEDED = 4
TOMBSTONE_FILE = "tombstone.json"
