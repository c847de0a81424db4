"""The reconcile policy as a pure function on a fake clock."""

from __future__ import annotations

from corral.domain.backoff import Backoff
from corral.domain.reconcile import (
    Action,
    ComponentState,
    ComponentStatus,
    InstallPolicy,
    reconcile,
)

POLICY = InstallPolicy(backoff=Backoff(base=30, factor=2, maximum=3600, jitter=0.0), cap=5)


def status(**kw) -> ComponentStatus:
    base = dict(
        observed_version="1.0.0",
        observed_sha256="a" * 64,
        target_version="1.1.0",
        target_sha256="b" * 64,
    )
    return ComponentStatus(**{**base, **kw})


def test_schedule_is_30_60_120_240_then_give_up_after_the_last_window():
    s, now, orders = status(), 0.0, []
    while now <= 3 * 3600:
        d = reconcile(s, now, POLICY, rand=0.5)
        if d.action is Action.INSTALL:
            orders.append(now)
        if d.action is Action.GIVE_UP:
            gave_up = now
            break
        s = ComponentStatus(
            **{
                **s.__dict__,
                "attempts": d.attempts,
                "next_attempt_at": d.next_attempt_at,
                "state": d.state,
            }
        )
        now += 1.0
    assert orders == [0, 30, 90, 210, 450]
    assert gave_up == 450 + 480  # the fifth order had its 480 s to land
    final = reconcile(
        ComponentStatus(**{**s.__dict__, "state": ComponentState.INSTALL_FAILED}),
        gave_up + 10**6,
        POLICY,
        0.5,
    )
    assert final.action is Action.NOTHING  # and nothing ever after


def test_converged_resets_and_needs_nothing():
    d = reconcile(status(observed_sha256="b" * 64, attempts=3), 0, POLICY, 0.1)
    assert (d.action, d.attempts) == (Action.CONVERGED, 0)


def test_no_target_no_action():
    assert (
        reconcile(status(target_sha256=None, target_version=None), 0, POLICY, 0.1).action
        is Action.NOTHING
    )


def test_downgrade_is_held_unless_allowed():
    s = status(observed_version="2.0.0")
    assert reconcile(s, 0, POLICY, 0.1).action is Action.HOLD
    assert (
        reconcile(ComponentStatus(**{**s.__dict__, "allow_downgrade": True}), 0, POLICY, 0.1).action
        is Action.INSTALL
    )


def test_incomparable_installed_version_is_held():
    d = reconcile(status(observed_version="main.12"), 0, POLICY, 0.1)
    assert d.action is Action.HOLD and "different schemes" in d.reason


def test_nothing_installed_is_not_a_downgrade():
    d = reconcile(status(observed_version=None, observed_sha256=None), 0, POLICY, 0.1)
    assert d.action is Action.INSTALL and d.attempts == 1
