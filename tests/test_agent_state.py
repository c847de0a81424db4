"""The agent's pure state machine (corral.agent.state): what it decides for each event,
and, by property, that no sequence of events (duplicated, reordered, late) breaks its
own invariants (`validate()`)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.agent import state as S
from corral.api import Fetch, HeartbeatReply, InstallOrder, KillOrder, StartOrder
from corral.domain.instances import AGENT_EXIT_RETIRED

SHAS = ["a" * 64, "b" * 64, "c" * 64]


def start(job: int, n: int) -> StartOrder:
    return StartOrder(
        job_id=job, attempt=n, token=f"tok-{job}-{n}", command=["x"], env={}, cpus=1, memory_mb=1
    )


def install(sha: str, version: str = "1.1.0") -> InstallOrder:
    return InstallOrder(component="runner", version=version, url="u", sha256=sha, size=1, order=1)


def reply(**kw) -> S.HeartbeatReplied:
    return S.HeartbeatReplied(HeartbeatReply(action=kw.pop("action", "continue"), interval=1, **kw))


def running() -> tuple[S.AgentState, float]:
    """An agent that registered and has a heartbeat in flight."""
    st_ = S.AgentState()
    out = st_.handle(S.Tick(), 0.0)
    assert out == [S.Register(None)]
    out = st_.handle(S.Registered("i-1", 1, 1.0), 0.0)
    assert len(out) == 1 and isinstance(out[0], S.SendHeartbeat)
    return st_, 0.0


def step(st_: S.AgentState, ev, now: float = 0.0) -> list:
    out = st_.handle(ev, now)
    st_.validate()
    return out


def kinds(out: list) -> list[str]:
    """The instructions' kinds, heartbeats left out."""
    return [type(i).__name__ for i in acts(out)]


def acts(out: list) -> list:
    return [i for i in out if not isinstance(i, S.SendHeartbeat)]


def test_registers_then_heartbeats_one_at_a_time():
    st_, _ = running()  # its first heartbeat went at 0.0, not to be held (wait 0)
    assert step(st_, S.Tick(), 0.2) == []  # one heartbeat in flight at a time
    # the reply to an exchange that asked not to be held: a held one follows at once
    held = heartbeat_in(step(st_, reply(), 0.3))
    assert held.wait > 0
    # a held exchange the server answered early with nothing: no spinning
    assert step(st_, reply(), 0.4) == []
    assert step(st_, S.Tick(), 0.7) == []
    hb = step(st_, S.Tick(), 0.8)  # IDLE_GAP after the last one went
    assert [type(i) for i in hb] == [S.SendHeartbeat] and hb[0].instance_id == "i-1"
    # a reply the server held (a long poll) is followed by the next heartbeat at once
    again = step(st_, reply(), 5.0)
    assert [type(i) for i in again] == [S.SendHeartbeat]


def test_news_sent_unheld_leaves_no_window_without_a_held_exchange():
    """An attempt that ends wakes an exchange carrying the news (wait 0); its reply comes
    at once. The next exchange, the one the server holds and answers with the next order
    for this instance, must go then, not IDLE_GAP later: an order placed meanwhile would
    wait for no one (idle submit-to-start was 0.45 s for one job in five)."""
    st_, _ = running()
    step(st_, reply(), 0.1)  # the first exchange's answer; a held one goes out
    step(st_, reply(start=[start(1, 1)]), 1.0)  # held, answered with an order
    step(st_, S.AttemptStarted(1, 1), 1.01)
    step(st_, reply(), 1.02)  # the exchange after the order, answered (nothing new)
    step(st_, S.Tick(), 1.6)  # the next held exchange goes out
    out = step(st_, S.RunnerExited(1, 1, report_lost=False, reason="exited 0"), 2.0)
    assert out == []  # news waits for the held exchange in flight
    news = heartbeat_in(step(st_, reply(), 2.1))  # the server ended the hold
    assert news.wait == 0 and news.attempts == ()
    after = step(st_, reply(), 2.11)
    assert heartbeat_in(after).wait > 0  # held again at once


def heartbeat_in(out: list) -> S.SendHeartbeat:
    (hb,) = [i for i in out if isinstance(i, S.SendHeartbeat)]
    return hb


def test_start_kill_and_lost_report_carry_the_attempts_token():
    st_, _ = running()
    out = step(st_, reply(start=[start(7, 1)]))
    assert kinds(out) == ["StartAttempt"]
    # orders came: the next heartbeat goes at once, reporting the attempt with its token
    assert [(a.job_id, a.token) for a in heartbeat_in(out).attempts] == [(7, "tok-7-1")]
    step(st_, S.AttemptStarted(7, 1))
    out = step(st_, reply(kill=[KillOrder(job_id=7, attempt=1, reason="requeued")]), 1.0)
    assert acts(out) == [S.KillAttempt(7, 1, "tok-7-1", "requeued")]
    # a kill for an attempt it does not run is a no-op, not a kill with a guessed token
    assert kinds(step(st_, reply(kill=[KillOrder(job_id=8, attempt=1, reason="x")]), 2.0)) == []


def test_a_newer_attempt_waits_for_the_older_one_of_the_same_job():
    st_, _ = running()
    step(st_, reply(start=[start(3, 1)]))
    out = step(st_, reply(start=[start(3, 2)]), 1.0)
    assert acts(out) == [S.KillAttempt(3, 1, "tok-3-1", "superseded by attempt 2")]
    assert kinds(step(st_, reply(start=[start(3, 1)]), 1.0)) == []  # late duplicate: ignored
    out = step(st_, S.RunnerExited(3, 1, report_lost=False, reason="killed"), 2.0)
    assert kinds(out) == ["StartAttempt"]
    assert acts(out)[0].order.attempt == 2


def test_a_runner_that_died_is_reported_lost_until_delivered():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    out = step(st_, S.RunnerExited(1, 1, report_lost=True, reason="runner died"), 1.0)
    assert S.ReportLost(1, 1, "tok-1-1", "runner died") in out
    step(st_, S.LostReported(1, 1, delivered=True), 1.0)
    assert (1, 1) not in st_.attempts


def test_no_install_of_what_is_installed_and_one_install_at_a_time():
    st_, _ = running()
    out = step(st_, reply(install=[install(SHAS[0])]))
    assert kinds(out) == ["Install"]
    step(st_, S.Tick(), 1.0)
    assert kinds(step(st_, reply(install=[install(SHAS[0])]), 1.0)) == []  # one under way
    step(st_, S.InstallDone("runner", "1.1.0", SHAS[0]), 2.0)
    step(st_, S.Tick(), 3.0)
    assert kinds(step(st_, reply(install=[install(SHAS[0])]), 3.0)) == []  # already there


def test_a_failed_install_is_reported_with_its_target():
    st_, _ = running()
    step(st_, reply(install=[install(SHAS[1])]))  # a held exchange goes at once
    assert step(st_, S.InstallFailed("runner", SHAS[1], "sha256 mismatch"), 1.0) == []
    out = step(st_, reply(), 1.1)  # the held exchange ends
    hb = next(i for i in out if isinstance(i, S.SendHeartbeat))  # at once, not after a wait
    assert hb.wait == 0.0
    (comp,) = hb.components
    assert (comp.error, comp.error_sha256) == ("sha256 mismatch", SHAS[1])


def test_retiring_kills_everything_exits_with_a_tombstone_and_starts_nothing():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1), start(2, 1)]))
    step(st_, S.Tick(), 1.0)
    out = step(st_, reply(action="exit", reason="retired"), 1.0)
    assert kinds(out) == ["KillAttempt", "KillAttempt", "Exit"]
    assert out[-1] == S.Exit(AGENT_EXIT_RETIRED, "retired", tombstone=True)
    assert step(st_, reply(start=[start(4, 1)]), 2.0) == []
    assert step(st_, S.Tick(), 99.0) == []


def test_superseded_leaves_the_runners_to_the_new_agent():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    out = step(st_, S.Superseded("another agent holds the data dir"), 1.0)
    assert out == [S.Exit(S.EXIT_SUPERSEDED, "another agent holds the data dir", tombstone=False)]


def test_an_exit_that_says_superseded_leaves_the_runners_and_writes_no_tombstone():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    step(st_, S.Tick(), 1.0)
    reason = "incarnation 1 superseded by 2"
    out = step(st_, reply(action="exit", reason=reason), 1.0)
    assert out == [S.Exit(S.EXIT_SUPERSEDED, reason, tombstone=False)]


def test_a_refused_registration_exits_without_touching_the_runners():
    st_ = S.AgentState(instance_id="i-1")
    st_.adopt(3, 1, "tok-3-1")
    assert step(st_, S.Tick(), 0.0) == [S.Register("i-1")]
    out = step(st_, S.Fatal(2, "registration refused (HTTP 403): no"), 0.1)
    assert out == [S.Exit(2, "registration refused (HTTP 403): no", tombstone=False)]
    assert step(st_, S.Tick(), 9.0) == []


def test_a_rolled_back_agent_build_is_reported_until_a_heartbeat_carried_it():
    st_ = S.AgentState()
    step(st_, S.RolledBack("d" * 64, "agent 2.0 rolled back: it crashed"), 0.0)
    step(st_, S.Tick(), 0.0)
    hb = heartbeat_in(step(st_, S.Registered("i-1", 1, 1.0), 0.0))
    (agent,) = [c for c in hb.components if c.name == "agent"]
    assert (agent.error_sha256, agent.error) == ("d" * 64, "agent 2.0 rolled back: it crashed")
    step(st_, S.HeartbeatFailed("down"), 0.1)  # not carried yet: it goes again
    hb = heartbeat_in(step(st_, S.Tick(), 60.0))
    assert [c.name for c in hb.components] == ["agent"]
    step(st_, reply(), 60.1)
    hb = heartbeat_in(step(st_, S.Tick(), 61.0))
    assert hb.components == ()


def test_a_runner_that_ended_makes_the_next_heartbeat_carry_every_object():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    step(st_, S.AttemptStarted(1, 1))
    step(st_, reply(), 1.0)  # that heartbeat carried the (empty) object list
    step(st_, S.Stored(("a" * 64,)), 1.1)  # an output lands; the runner has not ended
    hb = heartbeat_in(step(st_, reply(), 2.0))
    assert hb.objects == ("a" * 64,)
    hb = heartbeat_in(step(st_, reply(), 3.0))
    assert hb.objects is None  # unchanged: not sent again
    step(st_, S.RunnerExited(1, 1), 3.1)
    hb = heartbeat_in(step(st_, reply(), 4.0))
    assert hb.objects == ("a" * 64,)  # the runner's end: the full list again


def test_unreachable_server_backs_off_and_keeps_jobs():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    step(st_, S.Tick(), 0.5)
    step(st_, S.HeartbeatFailed("refused", rand=0.0), 0.5)
    assert step(st_, S.Tick(), 0.6) == []  # backing off
    hb = step(st_, S.Tick(), 2.0)
    assert [a.job_id for a in hb[0].attempts] == [1]


def test_replicas_are_fetched_once_and_reported():
    st_, _ = running()
    f = Fetch(sha256=SHAS[2], size=1, name="o", sources=["http://p"], token="t")
    assert kinds(step(st_, reply(replicate=[f]))) == ["FetchObject"]
    assert acts(step(st_, reply(replicate=[f]), 1.0)) == []  # being fetched: not again
    out = step(st_, S.TransferDone(SHAS[2]), 1.5)
    # reported at once on its own, and in the next heartbeat's object list
    assert kinds(out) == ["ReportCopies"] and out[0].sha256s == (SHAS[2],)
    hb = heartbeat_in(step(st_, reply(), 2.0))  # after the held exchange in flight
    assert hb.objects == (SHAS[2],)


def test_a_copy_that_lands_while_a_heartbeat_is_held_is_reported_at_once():
    """The server holds an idle heartbeat up to the interval: the copy's report must
    not wait for it (a drain waits on that report to retire its instance)."""
    st_, _ = running()
    f = Fetch(sha256=SHAS[2], size=1, name="o", sources=["http://p"], token="t")
    out = step(st_, reply(replicate=[f]))
    assert kinds(out) == ["FetchObject"]
    assert heartbeat_in(out).wait > 0  # held by the server
    out = step(st_, S.TransferDone(SHAS[2]), 1.5)
    assert [type(i).__name__ for i in out] == ["ReportCopies"]
    assert (out[0].instance_id, out[0].incarnation) == (st_.instance_id, st_.incarnation)
    # a copy it did not fetch on an order (found on disk) is the heartbeat's to report
    assert step(st_, S.TransferDone("d" * 64), 1.6) == []


def test_validate_catches_two_live_attempts_of_one_job():
    st_, _ = running()
    st_.attempts[(1, 1)] = S.Attempt(1, 1, "a", S.AttemptPhase.RUNNING)
    st_.attempts[(1, 2)] = S.Attempt(1, 2, "b", S.AttemptPhase.RUNNING)
    with pytest.raises(AssertionError, match="two live attempts"):
        st_.validate()


# ---- property: any sequence of events keeps the invariants --------------------------------

jobs = st.integers(1, 3)
numbers = st.integers(1, 3)
shas = st.sampled_from(SHAS)
starts = st.builds(start, jobs, numbers)
kills = st.builds(KillOrder, job_id=jobs, attempt=numbers, reason=st.just("k"))
installs = st.builds(install, shas, st.sampled_from(["1.0.0", "1.1.0"]))
fetches = st.builds(
    Fetch, sha256=shas, size=st.just(1), name=st.just("o"), sources=st.just(["p"]), token=st.none()
)
replies = st.builds(
    lambda action, s, k, i, f, lease: reply(
        action=action, start=s, kill=k, install=i, replicate=f, lease_interval=lease
    ),
    st.sampled_from(["continue"] * 9 + ["exit"]),
    st.lists(starts, max_size=3),
    st.lists(kills, max_size=2),
    st.lists(installs, max_size=2),
    st.lists(fetches, max_size=2),
    st.sampled_from([None, None, 0.3]),
)
leaving = st.one_of(
    st.builds(S.Retire, st.just("r")),
    st.builds(S.Superseded, st.just("s")),
    st.just(S.Stop()),
    st.builds(S.Fatal, st.just(2), st.just("refused")),
)
outputs = st.lists(shas).map(tuple)
exits = st.builds(S.RunnerExited, jobs, numbers, st.booleans(), st.just("r"), outputs)
# replies and ticks most often (the agent's life is mostly heartbeats); leaving rarely
events = st.one_of(
    *[replies] * 8,
    *[st.just(S.Tick())] * 3,
    st.builds(S.Registered, st.sampled_from(["i-1", "i-2"]), st.integers(1, 3), st.just(1.0)),
    st.builds(S.RegisterFailed, st.just("down"), st.floats(0, 0.99)),
    st.builds(S.HeartbeatFailed, st.just("down"), st.floats(0, 0.99)),
    st.just(S.HeartbeatRejected()),
    st.builds(S.LeaseAnswered, st.booleans(), st.booleans()),
    *[st.builds(S.AttemptStarted, jobs, numbers)] * 2,
    st.builds(S.StartFailed, jobs, numbers, st.just("disk full")),
    *[exits] * 3,
    st.builds(S.LostReported, jobs, numbers, st.booleans()),
    st.builds(S.TransferDone, shas),
    st.builds(S.TransferFailed, shas, st.just("e")),
    st.builds(S.InstallDone, st.just("runner"), st.sampled_from(["1.0.0", "1.1.0"]), shas),
    st.builds(S.InstallFailed, st.just("runner"), shas, st.just("e")),
    st.builds(S.RolledBack, shas, st.just("rolled back")),
    st.builds(S.Stored, st.lists(shas).map(tuple)),
    leaving,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(events, st.floats(0, 1)), max_size=80))
def test_no_event_sequence_breaks_the_invariants(seq):
    st_, now = running()
    starts_after_exit: list = []
    tokens: dict[tuple[int, int], str] = {}
    for ev, dt in seq:
        now += dt
        was_exited = st_.phase is S.Phase.EXITED
        out = st_.handle(ev, now)
        st_.validate()
        for i in out:
            if isinstance(i, S.StartAttempt):
                tokens[(i.order.job_id, i.order.attempt)] = i.order.token
            if isinstance(i, S.KillAttempt):
                assert tokens[(i.job_id, i.attempt)] == i.token
        if was_exited:
            starts_after_exit += out
    assert starts_after_exit == []  # an agent that left does nothing at all


def renewals(out: list) -> list:
    return [i for i in out if isinstance(i, S.RenewLease)]


def test_a_held_heartbeat_does_not_stop_lease_renewals():
    """Told to renew every 0.5 s between exchanges: with a heartbeat held by the
    server, renewals go out every 0.5 s after the last renewal of any kind, one at a
    time, and the next heartbeat says how often this agent renews."""
    st_, _ = running()
    out = step(st_, reply(lease_interval=0.5), 0.1)
    assert renewals(out) == []  # the heartbeat that went out at 0.0 renewed it
    held = heartbeat_in(out)  # the next exchange, held by the server, went at 0.1
    assert held.renews_every == 0.5
    assert renewals(step(st_, S.Tick(), 0.5)) == []
    assert renewals(step(st_, S.Tick(), 0.6)) == [S.RenewLease("i-1", 1, 0.5)]
    assert renewals(step(st_, S.Tick(), 1.2)) == []  # one renewal in flight at a time
    assert renewals(step(st_, S.LeaseAnswered(renewed=True), 1.3)) == [S.RenewLease("i-1", 1, 0.5)]


def test_a_renewal_refused_makes_the_next_heartbeat_go_at_once():
    st_, _ = running()
    step(st_, reply(lease_interval=0.5), 0.1)  # a heartbeat held by the server goes
    step(st_, S.Tick(), 1.0)  # a renewal
    out = step(st_, S.LeaseAnswered(renewed=False, exchange=True), 1.1)
    assert out == []  # one heartbeat in flight at a time: it waits for the held one
    hb = heartbeat_in(step(st_, reply(lease_interval=0.5), 1.2))
    assert hb.wait == 0.0  # not held: the server wants to hear from it now


def test_no_renewal_before_registration_or_after_the_credential_is_refused():
    st_ = S.AgentState(lease_interval=0.5)
    assert renewals(step(st_, S.Tick(), 5.0)) == []  # unregistered: it registers first
    st_, _ = running()
    step(st_, reply(lease_interval=0.5), 0.1)
    step(st_, S.Tick(), 0.5)
    step(st_, S.HeartbeatRejected(), 0.6)
    assert st_.phase is S.Phase.UNREGISTERED
    assert renewals(step(st_, S.Tick(), 2.0)) == []


def test_a_lost_report_that_did_not_arrive_is_sent_again():
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    step(st_, S.RunnerExited(1, 1, report_lost=True, reason="runner died"), 1.0)
    step(st_, S.LostReported(1, 1, delivered=False), 1.0)
    again = [i for i in step(st_, S.Tick(), 2.0) if isinstance(i, S.ReportLost)]
    assert again == [S.ReportLost(1, 1, "tok-1-1", "runner ended unreported")]
    assert [i for i in step(st_, S.Tick(), 3.0) if isinstance(i, S.ReportLost)] == []


def test_the_property_catches_an_agent_that_runs_a_job_twice(monkeypatch: pytest.MonkeyPatch):
    """The check put to the test: an agent that starts every order it gets, without
    waiting for the job's older attempt to be gone, is caught by validate()."""

    def eager(self, order):
        key = (order.job_id, order.attempt)
        if self.phase is not S.Phase.RUNNING or key in self.attempts:
            return []
        self.attempts[key] = S.Attempt(*key, order.token, S.AttemptPhase.STARTING)
        return [S.StartAttempt(order)]

    monkeypatch.setattr(S.AgentState, "_start", eager)
    st_, _ = running()
    step(st_, reply(start=[start(1, 1)]))
    with pytest.raises(AssertionError, match="two live attempts"):
        step(st_, reply(start=[start(1, 2)]), 1.0)


def test_a_stray_reply_is_not_taken_for_the_heartbeat_in_flight():
    st_, _ = running()
    first = st_.in_flight
    assert isinstance(first, S.SendHeartbeat)
    out = step(st_, S.HeartbeatReplied(reply().reply, first.seq))
    second = st_.in_flight
    assert [second] == out  # held by the server: the next exchange
    assert isinstance(second, S.SendHeartbeat) and second.seq == first.seq + 1
    # the first reply delivered again while the second heartbeat is out: ignored
    assert step(st_, S.HeartbeatReplied(reply(start=[start(1, 1)]).reply, first.seq), 1.0) == []
    assert st_.in_flight is second


def test_an_offload_order_for_an_object_not_held_is_answered_not_dropped():
    """The server may order an upload of a runner's output before the agent's store
    scan saw it; an order the machine cannot carry out is reported back as an offload
    error (the server retries it), never silently dropped (the server would wait on it
    for ever)."""
    from corral.api import OffloadOrder

    st_, _ = running()
    o = OffloadOrder(sha256=SHAS[0], size=1, url="http://s3/x", headers={})
    out = step(st_, reply(offload=[o]))
    assert kinds(out) == []
    hb = heartbeat_in(out + step(st_, S.Tick(), 1.0))
    assert [e.sha256 for e in hb.offload_errors] == [SHAS[0]]
    assert "not held" in hb.offload_errors[0].error
    # once held, the same order is carried out
    step(st_, S.Stored((SHAS[0],)), 1.0)
    assert kinds(step(st_, reply(offload=[o]), 1.5)) == ["OffloadObject"]
