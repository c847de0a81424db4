"""Component reconciliation: should this instance be told to install its target?

Pure: the caller passes the time and a random number. Each install order is counted;
orders back off exponentially with jitter and stop at a cap, after which the
component is `install_failed` until its target changes. A target that would be a
downgrade, or that cannot be compared with what is installed, is held: only an
explicit rollout (allow_downgrade) installs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from corral.domain.backoff import Backoff
from corral.domain.errors import IncomparableVersions
from corral.domain.versions import InvalidVersion, is_downgrade


class ComponentState(StrEnum):
    UNMANAGED = "unmanaged"  # reported by the agent, no desired version for it
    CONVERGED = "converged"  # observed sha256 is the target's
    PENDING = "pending"  # target set, install due now or after backoff
    INSTALLING = "installing"  # an order is out, waiting for the agent to report
    HELD = "held"  # would downgrade (or cannot be compared): needs an explicit rollout
    INSTALL_FAILED = "install_failed"  # cap reached; a WARNING was raised


class RolloutState(StrEnum):
    ACTIVE = "active"  # targeting instances batch by batch
    PAUSED = "paused"  # too many instances failed; a person resumes or rolls back
    COMPLETED = "completed"  # every instance in scope converged; newcomers still get it
    SUPERSEDED = "superseded"  # a newer rollout of the component for the fleet replaced it
    ROLLED_BACK = "rolled_back"


class Action(StrEnum):
    NOTHING = "nothing"
    INSTALL = "install"
    WAIT = "wait"
    HOLD = "hold"
    GIVE_UP = "give_up"
    CONVERGED = "converged"


@dataclass(frozen=True)
class InstallPolicy:
    backoff: Backoff = field(
        default_factory=lambda: Backoff(base=30.0, factor=2.0, maximum=3600.0, jitter=0.2)
    )
    cap: int = 5

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError("cap must be >= 1")


@dataclass(frozen=True)
class ComponentStatus:
    observed_version: str | None
    observed_sha256: str | None
    target_version: str | None
    target_sha256: str | None
    attempts: int = 0
    next_attempt_at: float = 0.0
    state: ComponentState = ComponentState.PENDING
    allow_downgrade: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    state: ComponentState | None
    attempts: int
    next_attempt_at: float
    reason: str = ""


def reconcile(status: ComponentStatus, now: float, policy: InstallPolicy, rand: float) -> Decision:
    s = status
    if s.target_sha256 is None:
        return Decision(Action.NOTHING, None, s.attempts, s.next_attempt_at)
    if s.observed_sha256 == s.target_sha256:
        return Decision(
            Action.CONVERGED, ComponentState.CONVERGED, 0, 0.0, f"{s.target_version} installed"
        )
    if s.state is ComponentState.INSTALL_FAILED:
        return Decision(
            Action.NOTHING,
            ComponentState.INSTALL_FAILED,
            s.attempts,
            s.next_attempt_at,
            "gave up earlier",
        )
    if not s.allow_downgrade and s.target_version is not None:
        try:
            if is_downgrade(s.observed_version, s.target_version):
                return Decision(
                    Action.HOLD,
                    ComponentState.HELD,
                    s.attempts,
                    s.next_attempt_at,
                    f"installed {s.observed_version} is newer than {s.target_version}"
                    "; no automatic downgrade (roll back explicitly)",
                )
        except (IncomparableVersions, InvalidVersion) as exc:
            return Decision(
                Action.HOLD,
                ComponentState.HELD,
                s.attempts,
                s.next_attempt_at,
                f"{exc}; replace it with an explicit rollout (--force)",
            )
    if now < s.next_attempt_at:
        # the last order gets its whole window to land before anything else happens
        return Decision(Action.WAIT, s.state, s.attempts, s.next_attempt_at)
    if s.attempts >= policy.cap:
        return Decision(
            Action.GIVE_UP,
            ComponentState.INSTALL_FAILED,
            s.attempts,
            s.next_attempt_at,
            f"{s.attempts} install orders did not converge on {s.target_version}",
        )
    attempts = s.attempts + 1
    return Decision(
        Action.INSTALL,
        ComponentState.INSTALLING,
        attempts,
        now + policy.backoff.delay(attempts, rand),
        f"install {s.target_version} (order {attempts} of at most {policy.cap})",
    )
