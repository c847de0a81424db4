"""The job and attempt state machines, as pure functions (no database, no clock)."""

from __future__ import annotations

import itertools

import pytest

from corral.domain.errors import IllegalTransition
from corral.domain.jobs import (
    ATTEMPT_TRANSITIONS,
    JOB_TRANSITIONS,
    AttemptState,
    JobState,
    after_command_exit,
    after_lost_attempt,
    check_attempt_transition,
    check_job_transition,
    job_sources,
)

Q, L, R = JobState.QUEUED, JobState.LOCKED, JobState.RUNNING
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED

# The contract, written out independently of the table in corral.domain.jobs.
ALLOWED_JOB = {
    (Q, L),
    (Q, F),
    (Q, C),
    (L, R),
    (L, Q),
    (L, F),
    (L, C),
    (R, S),
    (R, F),
    (R, C),
    (R, Q),
}
ALL_JOB_PAIRS = list(itertools.product(JobState, JobState))


def test_table_is_exactly_the_contract():
    table = {(a, b) for a, targets in JOB_TRANSITIONS.items() for b in targets}
    assert table == ALLOWED_JOB


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED_JOB))
def test_allowed_job_transitions_pass(current, target):
    check_job_transition(current, target)


ILLEGAL_JOB = sorted(set(ALL_JOB_PAIRS) - ALLOWED_JOB)


@pytest.mark.parametrize(("current", "target"), ILLEGAL_JOB)
def test_every_illegal_job_transition_is_refused(current, target):
    with pytest.raises(IllegalTransition) as exc:
        check_job_transition(current, target)
    assert str(current) in str(exc.value) and str(target) in str(exc.value)


def test_illegal_list_covers_the_known_dangerous_moves():
    # a finished job never moves again, and never succeeds without running
    assert (S, Q) in ILLEGAL_JOB and (F, R) in ILLEGAL_JOB and (C, L) in ILLEGAL_JOB
    assert (Q, S) in ILLEGAL_JOB and (L, S) in ILLEGAL_JOB
    assert (S, S) in ILLEGAL_JOB  # completing twice is illegal


def test_final_states_are_terminal():
    for state in (S, F, C):
        assert JOB_TRANSITIONS[state] == frozenset()


def test_sources_are_the_inverse_of_the_table():
    for target in JobState:
        expected = {a for (a, b) in ALLOWED_JOB if b == target}
        assert job_sources(target) == expected


AI, AR = AttemptState.ISSUED, AttemptState.RUNNING
AS, AF, AL, AV = (
    AttemptState.SUCCEEDED,
    AttemptState.FAILED,
    AttemptState.LOST,
    AttemptState.REVOKED,
)
ALLOWED_ATTEMPT = {
    (AI, AR),
    (AI, AV),
    (AI, AL),
    (AI, AF),
    (AR, AS),
    (AR, AF),
    (AR, AL),
    (AR, AV),
}


def test_attempt_table_is_exactly_the_contract():
    table = {(a, b) for a, targets in ATTEMPT_TRANSITIONS.items() for b in targets}
    assert table == ALLOWED_ATTEMPT


@pytest.mark.parametrize(
    ("current", "target"),
    sorted(set(itertools.product(AttemptState, AttemptState)) - ALLOWED_ATTEMPT),
)
def test_every_illegal_attempt_transition_is_refused(current, target):
    with pytest.raises(IllegalTransition):
        check_attempt_transition(current, target)


def test_unknown_state_is_an_error():
    with pytest.raises(ValueError):
        check_job_transition("queued", "exploded")


def test_lost_attempt_requeues_while_attempts_remain():
    assert after_lost_attempt(1, 3, "x").job_state is Q
    assert after_lost_attempt(2, 3, "x").job_state is Q


def test_last_lost_attempt_fails_with_a_reason_that_says_so():
    outcome = after_lost_attempt(3, 3, "instance i-1 stopped heartbeating")
    assert outcome.job_state is F
    assert "gave up after 3 attempts" in outcome.reason
    assert "max_attempts=3" in outcome.reason
    assert "instance i-1 stopped heartbeating" in outcome.reason


def test_single_attempt_job_fails_on_first_loss():
    outcome = after_lost_attempt(1, 1, "runner crashed")
    assert outcome.job_state is F and "1 attempt " in outcome.reason


def test_command_exit_decides_success():
    assert after_command_exit(0) is S
    assert after_command_exit(3) is F
    assert after_command_exit(137) is F
