"""Provisioning decisions (pure): when to try, when to wait, backoff and the cap,
failures no retry can fix, and which pool machine a new instance gets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.domain.backoff import Backoff
from corral.domain.provisioning import (
    FailureKind,
    ProvisionError,
    ProvisionPolicy,
    ProvisionState,
    Step,
    after_failure,
    free_slots,
    next_step,
    stop_retry_at,
)

POLICY = ProvisionPolicy(
    backoff=Backoff(base=10, factor=2, maximum=600, jitter=0.2), cap=3, register_timeout=60
)


def step(state, *, updated_at=0.0, next_at=None, in_progress=False, now=100.0):
    return next_step(
        state,
        updated_at=updated_at,
        next_at=next_at,
        in_progress=in_progress,
        now=now,
        policy=POLICY,
    )


def test_a_new_instance_is_provisioned_at_once():
    assert step(None) is Step.START


def test_a_try_in_progress_is_left_alone_unless_its_server_is_gone():
    for s in (ProvisionState.CONNECTING, ProvisionState.INSTALLING):
        assert step(s, in_progress=True) is Step.WAIT
        assert step(s, in_progress=False) is Step.START  # taken over


def test_a_started_agent_must_register_in_time():
    assert step(ProvisionState.STARTED, updated_at=50, now=100) is Step.WAIT
    assert step(ProvisionState.STARTED, updated_at=30, now=100) is Step.TIMED_OUT


def test_backoff_waits_until_due_and_failed_waits_for_a_person():
    assert step(ProvisionState.BACKOFF, next_at=120, now=100) is Step.WAIT
    assert step(ProvisionState.BACKOFF, next_at=100, now=100) is Step.START
    assert step(ProvisionState.FAILED, now=10**9) is Step.WAIT
    assert step(ProvisionState.READY) is Step.WAIT


def test_failures_back_off_doubling_then_give_up_at_the_cap():
    err = ProvisionError(FailureKind.UNREACHABLE, "connection refused")
    first = after_failure(err, 1, 100.0, POLICY, 0.999)
    second = after_failure(err, 2, 100.0, POLICY, 0.999)
    assert first.state is second.state is ProvisionState.BACKOFF
    assert 8 <= (first.delay or 0) <= 10 and 16 <= (second.delay or 0) <= 20
    assert first.next_at == 100.0 + (first.delay or 0)
    assert "retrying in" in first.why and "attempt 1 of 3" in first.why
    last = after_failure(err, 3, 100.0, POLICY, 0.5)
    assert (last.state, last.next_at) == (ProvisionState.FAILED, None)
    assert "gave up after 3" in last.why


def test_a_changed_or_unknown_host_key_is_never_retried():
    for kind in (FailureKind.HOST_KEY_CHANGED, FailureKind.HOST_KEY_UNKNOWN):
        err = ProvisionError(kind, "the key differs")
        assert not err.retryable
        then = after_failure(err, 1, 0.0, POLICY, 0.5)
        assert (then.state, then.next_at) == (ProvisionState.FAILED, None)
    for kind in set(FailureKind) - {FailureKind.HOST_KEY_CHANGED, FailureKind.HOST_KEY_UNKNOWN}:
        assert ProvisionError(kind, "x").retryable


@given(st.integers(min_value=1, max_value=100), st.floats(min_value=0, max_value=0.999))
def test_stopping_is_retried_later_and_never_sooner_than_the_backoff_allows(failures, rand):
    at = stop_retry_at(failures, 1000.0, POLICY, rand)
    assert 1000.0 + 8 <= at <= 1000.0 + 600


def test_new_instances_get_free_pool_machines_in_order():
    pool = ["ssh:root@a:22", "ssh:root@b:22", "ssh:root@c:22"]
    assert free_slots(pool, ["ssh:root@b:22", None], 5) == ["ssh:root@a:22", "ssh:root@c:22"]
    assert free_slots(pool, [], 1) == ["ssh:root@a:22"]
    assert free_slots(pool, pool, 2) == []
    assert free_slots(pool, [], 0) == []


@given(
    st.lists(st.sampled_from("abcdefgh"), unique=True),
    st.lists(st.sampled_from("abcdefgh")),
    st.integers(min_value=0, max_value=10),
)
def test_no_machine_is_ever_handed_out_twice(pool, taken, count):
    got = free_slots(pool, taken, count)
    assert len(got) == len(set(got)) <= count
    assert not set(got) & set(taken) and set(got) <= set(pool)
