"""Provisioning: a backend's work on an instance's machine before its agent registers
(connect, check, install, start) and after it retires (stop, clean up), the ways that
work fails, and bounded retries with backoff. Pure: time and randomness are passed in.

    (none) -> connecting -> installing -> started -> ready (its agent registered)
                 |             |             |
                 +-- failure --+             +-- no registration in time
                        v                             v
             backoff (retried at next_at), or failed (the cap was reached, or a
             failure no retry can fix: a changed or unknown host key)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from corral.domain.backoff import Backoff


class ProvisionState(StrEnum):
    CONNECTING = "connecting"
    INSTALLING = "installing"  # installing and starting its agent
    STARTED = "started"  # the agent was started; waiting for it to register
    READY = "ready"  # its agent registered
    BACKOFF = "backoff"  # the last try failed; the next one is due at next_at
    FAILED = "failed"  # given up: the cap, or a failure a retry cannot fix
    STOP_FAILED = "stop_failed"  # stopping its agent failed; retried at next_at


IN_PROGRESS = frozenset({ProvisionState.CONNECTING, ProvisionState.INSTALLING})


class FailureKind(StrEnum):
    UNREACHABLE = "unreachable"  # no route, refused, timed out, connection lost
    AUTH = "auth"  # the host refused our key
    HOST_KEY_CHANGED = "host_key_changed"  # the host presented another key than the known one
    HOST_KEY_UNKNOWN = "host_key_unknown"  # not in the known_hosts the fleet names
    UNSUPPORTED = "unsupported"  # not Linux, or neither curl nor wget
    NO_PYTHON = "no_python"  # no Python (>= 3.11) where the fleet says
    DISK_FULL = "disk_full"
    BOOTSTRAP = "bootstrap"  # the install script failed (download, sha256, self-test)
    NOT_REGISTERED = "not_registered"  # the agent started but never registered
    ERROR = "error"  # anything else


# Failures a retry cannot fix: a person must look (a changed key may be an attack).
FINAL = frozenset({FailureKind.HOST_KEY_CHANGED, FailureKind.HOST_KEY_UNKNOWN})


class ProvisionError(Exception):
    """A backend could not provision (or stop) a machine; `message` says why, for
    people, and never holds a secret."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind not in FINAL

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class ProvisionPolicy:
    backoff: Backoff = field(
        default_factory=lambda: Backoff(base=10.0, factor=2.0, maximum=600.0, jitter=0.2)
    )
    cap: int = 5  # tries before giving up
    register_timeout: float = 120.0  # a started agent must register within this

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError("cap must be >= 1")
        if self.register_timeout <= 0:
            raise ValueError("register_timeout must be > 0")


class Step(StrEnum):
    START = "start"  # provision now: the first try, a retry that is due, or a takeover
    WAIT = "wait"  # in progress, backing off, or given up
    TIMED_OUT = "timed_out"  # started, but its agent did not register in time


def next_step(
    state: ProvisionState | str | None,
    *,
    updated_at: float | None,
    next_at: float | None,
    in_progress: bool,
    now: float,
    policy: ProvisionPolicy,
) -> Step:
    """What to do about a pending instance (its agent has not registered). `in_progress`:
    a live server (this one or another) is provisioning it right now."""
    if state is None:
        return Step.START
    state = ProvisionState(state)
    if state in IN_PROGRESS:
        # whoever was provisioning it is gone (a server stopped): take it over
        return Step.WAIT if in_progress else Step.START
    if state is ProvisionState.STARTED:
        if now - (updated_at or now) > policy.register_timeout:
            return Step.TIMED_OUT
        return Step.WAIT
    if state is ProvisionState.BACKOFF:
        return Step.START if now >= (next_at or 0.0) else Step.WAIT
    return Step.WAIT  # failed (a person re-applies the fleet), ready, stop_failed


@dataclass(frozen=True)
class AfterFailure:
    state: ProvisionState
    next_at: float | None  # when it is tried again; None: never (given up)
    delay: float | None
    why: str  # what happens next, for the event


def after_failure(
    error: ProvisionError, attempts: int, now: float, policy: ProvisionPolicy, rand: float
) -> AfterFailure:
    """Try `attempts` failed with `error`: back off and retry, or give up."""
    if not error.retryable:
        return AfterFailure(
            ProvisionState.FAILED, None, None, "not retried: a person must fix this first"
        )
    if attempts >= policy.cap:
        return AfterFailure(
            ProvisionState.FAILED, None, None, f"gave up after {attempts} attempt(s)"
        )
    delay = policy.backoff.delay(attempts, rand)
    return AfterFailure(
        ProvisionState.BACKOFF,
        now + delay,
        delay,
        f"attempt {attempts} of {policy.cap}; retrying in {delay:.1f}s",
    )


def stop_retry_at(failures: int, now: float, policy: ProvisionPolicy, rand: float) -> float:
    """When to try again to stop the agent of a retired instance. Never given up: the
    instance stays retired (it holds nothing) until its machine is cleaned."""
    return now + policy.backoff.delay(max(1, failures), rand)


def free_slots(pool: Iterable[str], taken: Iterable[str | None], count: int) -> list[str]:
    """The first `count` machines of a fixed pool (e.g. a fleet's SSH hosts) that no
    instance occupies, in the pool's order."""
    used = {t for t in taken if t}
    return [s for s in pool if s not in used][: max(0, count)]
