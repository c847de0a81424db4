"""Instance lifecycle, admission, placement, heartbeat pacing and backoff (pure)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.backoff import Backoff
from corral.domain.errors import IllegalTransition
from corral.domain.heartbeat import grace_period, heartbeat_interval, is_lost
from corral.domain.instances import (
    INSTANCE_TRANSITIONS,
    Admission,
    InstanceState,
    accepts_jobs,
    accepts_replicas,
    check_instance_transition,
    decide_heartbeat,
    decide_register,
)
from corral.domain.placement import (
    Capacity,
    JobDemand,
    first_page,
    fits_anywhere,
    has_room,
    place,
    place_exhaustively,
    waiting_reason,
)

P, RUN, D, RET, T = (
    InstanceState.PENDING,
    InstanceState.RUNNING,
    InstanceState.DRAINING,
    InstanceState.RETIRED,
    InstanceState.TERMINATED,
)
ALLOWED = {(P, RUN), (P, D), (P, T), (RUN, D), (D, RUN), (D, RET), (RET, T)}


def test_instance_table_is_the_contract():
    assert {(a, b) for a, ts in INSTANCE_TRANSITIONS.items() for b in ts} == ALLOWED


@pytest.mark.parametrize(
    ("current", "target"), sorted(set(itertools.product(InstanceState, InstanceState)) - ALLOWED)
)
def test_illegal_instance_transitions_are_refused(current, target):
    with pytest.raises(IllegalTransition):
        check_instance_transition(current, target)


def test_retired_never_comes_back():
    for target in InstanceState:
        if target is not T:
            with pytest.raises(IllegalTransition):
                check_instance_transition(RET, target)


@pytest.mark.parametrize("state", [RET, T, None])
def test_register_of_gone_or_unknown_instance_is_told_to_exit(state):
    decision = decide_register(state)
    assert decision.admission is Admission.EXIT


def test_register_keeps_draining_draining():
    assert decide_register(D).state_after is D
    assert decide_register(RUN).state_after is RUN
    assert decide_register(P).state_after is RUN


def test_heartbeat_from_superseded_incarnation_exits():
    assert decide_heartbeat(RUN, 4, 3).admission is Admission.EXIT
    assert decide_heartbeat(RUN, 4, 4).admission is Admission.WELCOME
    assert decide_heartbeat(RET, 4, 4).admission is Admission.EXIT
    assert decide_heartbeat(None, None, 1).admission is Admission.EXIT


def test_only_running_reachable_instances_take_jobs_or_replicas():
    for s in InstanceState:
        assert accepts_jobs(s, lost=False) == (s is RUN)
        assert accepts_replicas(s, lost=False) == (s is RUN)
        assert not accepts_jobs(s, lost=True)
        assert not accepts_replicas(s, lost=True)


def cap(i, cpus=2.0, mem=1000, fleet=None, used=0.0, running=0):
    return Capacity(i, fleet, cpus, mem, used_cpus=used, running=running)


def test_place_prefers_idle_then_packs():
    a, b = cap("a", used=1.0, running=1), cap("b")
    out = place([JobDemand(1, 1.0, 0)], [a, b])
    assert out == [(1, "b")]  # idle b before half-busy a


def test_place_respects_cpu_memory_and_fleet():
    insts = [cap("a", cpus=1, mem=100, fleet="x"), cap("b", cpus=4, mem=4000, fleet="y")]
    out = place(
        [JobDemand(1, 2, 0), JobDemand(2, 1, 200), JobDemand(3, 1, 0, "x"), JobDemand(4, 8, 0)],
        insts,
    )
    assert dict(out) == {1: "b", 2: "b", 3: "a"}  # job 4 fits nowhere


def test_place_never_overcommits():
    insts = [cap("a", cpus=2), cap("b", cpus=1)]
    out = place([JobDemand(i, 1, 0) for i in range(10)], insts)
    assert len(out) == 3
    assert sum(1 for _, i in out if i == "a") == 2


_fleet = st.sampled_from([None, "a", "b"])


@given(
    st.lists(
        st.tuples(st.sampled_from([0.25, 0.5, 1, 2, 3]), st.sampled_from([0, 100, 900]), _fleet),
        max_size=60,
    ),
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 4]), st.sampled_from([0, 1000]), _fleet, st.integers(0, 4)
        ),
        max_size=8,
    ),
)
def test_place_chooses_as_trying_every_instance_for_every_job(jobs, insts):
    def capacities():
        return [
            Capacity(f"i{k}", f, c, m, used_cpus=min(c, used / 2), running=used, order=(k % 3,))
            for k, (c, m, f, used) in enumerate(insts)
        ]

    demands = [JobDemand(k, c, m, f) for k, (c, m, f) in enumerate(jobs)]
    fast, slow = capacities(), capacities()
    assert place(demands, fast) == place_exhaustively(demands, slow)
    assert fast == slow  # the same room left on every instance


def test_fits_anywhere_ignores_current_load():
    busy = cap("a", cpus=2, used=2, running=2)
    assert fits_anywhere(JobDemand(1, 2, 0), [busy])
    assert not fits_anywhere(JobDemand(1, 3, 0), [busy])


@given(
    st.lists(st.tuples(st.floats(0.1, 4), st.integers(0, 2000)), max_size=40),
    st.lists(st.tuples(st.floats(0.5, 8), st.integers(0, 8000)), min_size=1, max_size=6),
)
def test_placement_respects_capacity_for_any_input(jobs, insts):
    caps = [cap(f"i{k}", cpus=c, mem=m) for k, (c, m) in enumerate(insts)]
    totals = {c.instance_id: (c.cpus, c.memory_mb) for c in caps}
    demands = [JobDemand(k, c, m) for k, (c, m) in enumerate(jobs)]
    out = place(demands, caps)
    used: dict[str, list[float]] = {}
    for job_id, inst in out:
        d = demands[job_id]
        u = used.setdefault(inst, [0.0, 0])
        u[0] += d.cpus
        u[1] += d.memory_mb
    for inst, (c, m) in used.items():
        assert c <= totals[inst][0] + 1e-6 and m <= totals[inst][1]
    assert len({j for j, _ in out}) == len(out)


def test_heartbeat_interval_caps_total_rate():
    assert heartbeat_interval(1) == 2.0
    assert heartbeat_interval(100) == 2.0
    assert heartbeat_interval(1000) == 20.0  # 1000 agents / 20 s = 50/s
    assert heartbeat_interval(100000) == 30.0  # never rarer than the ceiling
    for n in (10, 500, 1500):
        assert n / heartbeat_interval(n) <= 50.0 + 1e-9
    with pytest.raises(ValueError):
        heartbeat_interval(-1)


def test_grace_is_at_least_three_intervals():
    assert grace_period(2.0, 1.0) == 7.0
    assert grace_period(2.0, 20.0) == 20.0


def test_is_lost_uses_the_time_passed_in():
    assert not is_lost(100.0, now=105.0, grace=10.0)
    assert is_lost(100.0, now=111.0, grace=10.0)
    assert not is_lost(None, now=1e9, grace=1.0)


def test_backoff_schedule_on_a_fake_clock():
    b = Backoff(base=30, factor=2, maximum=3600, jitter=0.0)
    assert [b.delay(n, 0.5) for n in range(1, 9)] == [30, 60, 120, 240, 480, 960, 1920, 3600]
    assert b.delay(50, 0.0) == 3600  # capped, no overflow


@given(st.integers(1, 200), st.floats(0, 0.999999))
def test_backoff_jitter_stays_within_bounds(failures, rand):
    b = Backoff(base=30, factor=2, maximum=3600, jitter=0.2)
    top = b.ceiling(failures)
    assert top * 0.8 - 1e-9 <= b.delay(failures, rand) <= top + 1e-9


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(jitter=2)
    with pytest.raises(ValueError):
        Backoff().delay(1, 1.0)


def test_silence_the_server_could_not_observe_extends_every_deadline():
    from corral.domain.heartbeat import is_silent_too_long, unobserved

    # the database was down from 100 to 160; agents retry within 10 s of its return
    outages = [(100.0, 160.0)]
    assert unobserved(99.0, 200.0, outages, 10.0) == 70.0
    assert unobserved(150.0, 200.0, outages, 10.0) == 20.0  # only the part after 150
    assert unobserved(0.0, 200.0, [(100.0, 160.0), (120.0, 140.0)], 0.0) == 60.0  # once
    # an agent last heard at 99 (just before the outage), grace 4 s
    assert not is_silent_too_long(99.0, now=160.0, grace=4.0, outages=outages)
    assert not is_silent_too_long(99.0, now=172.0, grace=4.0, outages=outages, recovery=10.0)
    assert is_silent_too_long(99.0, now=175.0, grace=4.0, outages=outages, recovery=10.0)
    # without the outage it would have been lost long before
    assert is_silent_too_long(99.0, now=110.0, grace=4.0)
    assert not is_silent_too_long(None, now=1e9, grace=1.0)
    # an agent that went silent after the outage is judged as usual
    assert is_silent_too_long(180.0, now=185.0, grace=4.0, outages=outages)


def test_the_reapers_round_trips_define_the_outages():
    from corral.domain.heartbeat import Observation

    obs = Observation(tolerance=3.0)
    assert obs.observed(10.0) is None and obs.gaps(11.0) == []
    assert obs.observed(12.0) is None  # a normal tick
    # no round trip worked from 12 to 50: while the server is only now observing
    # again, the current gap already counts; once it worked, it is an outage
    assert obs.gaps(50.0) == [(12.0, 50.0)]
    assert obs.observed(50.0) == (12.0, 50.0)
    assert obs.gaps(51.0) == [(12.0, 50.0)]
    assert obs.extension(51.0, recovery=10.0) == 38.0 + 1.0
    # a slow database: each round trip takes 5 s, but the next starts on time after it
    slow = Observation(tolerance=3.0)
    for start in (0.0, 6.0, 12.0, 18.0):
        assert slow.observed(start, start + 5.0) is None
    assert slow.gaps(24.0) == [] and slow.extension(24.0) == 0.0


def test_agents_and_runners_retry_within_the_ceiling_the_reaper_allows_for():
    from corral.agent.daemon import RECONNECT
    from corral.agent.upstream import RETRY
    from corral.domain.heartbeat import AGENT_RETRY_CEILING

    assert RECONNECT.maximum <= AGENT_RETRY_CEILING
    assert RETRY.maximum <= AGENT_RETRY_CEILING


def test_a_job_no_instance_could_hold_says_what_it_needs():
    assert waiting_reason(JobDemand(1, 64, 0, None)) == "waiting: no running instance has 64 cpus"
    assert waiting_reason(JobDemand(2, 0.5, 2048, "gpu")) == (
        "waiting: no running instance in fleet 'gpu' has 0.5 cpus and 2048 MB memory"
    )


def test_a_pass_reads_a_first_page_sized_to_the_room_and_stops_when_none_is_left():
    full = Capacity("a", None, cpus=16, memory_mb=1000, used_cpus=16)
    one_free = Capacity("b", None, cpus=16, memory_mb=1000, used_cpus=15)
    idle = Capacity("c", None, cpus=64, memory_mb=1000)
    assert not has_room([full])
    assert has_room([full, one_free])
    assert has_room([Capacity("d", None, cpus=1, memory_mb=0, used_cpus=0.75)])
    assert first_page([full], 200) == 8  # never less than a few
    assert first_page([full, one_free], 200) == 8
    assert first_page([idle], 200) == 129  # twice the one-cpu jobs that fit, and one
    assert first_page([idle, idle, idle, idle], 200) == 200  # never more than the batch
