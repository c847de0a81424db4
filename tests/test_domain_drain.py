"""Drain planning and autoscaling decisions (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.domain.drain import (
    Holder,
    ObjectInfo,
    Recipient,
    ScaleVote,
    at_risk,
    desired_size,
    lost_without,
    may_retire,
    plan_copies,
    retire_first,
    safe_without,
    vote,
)
from corral.domain.instances import InstanceState as S

RUN, DRAIN, RET = S.RUNNING, S.DRAINING, S.RETIRED


def obj(sha, *holders, size=10, durable=False, pending=()):
    return ObjectInfo(
        sha, size, tuple(Holder(i, st, lost) for i, st, lost in holders), tuple(pending), durable
    )


def test_a_copy_on_a_draining_or_retired_or_lost_instance_does_not_count():
    o = obj("x", ("a", DRAIN, False), ("b", DRAIN, False), ("c", RET, False), ("d", RUN, True))
    assert not safe_without(o, "a")
    assert at_risk([o], "a") == [o]
    assert safe_without(obj("x", ("a", DRAIN, False), ("b", RUN, False)), "a")
    assert safe_without(obj("x", ("a", DRAIN, False), durable=True), "a")


def test_a_draining_holder_still_holds_so_the_object_is_not_lost_without_the_leaver():
    # an object held by two draining instances is at risk (it needs a copy on a
    # running instance) but leaving one of them loses nothing: the other still holds it
    o = obj("x", ("a", DRAIN, False), ("b", DRAIN, False))
    assert at_risk([o], "a") == [o]
    assert lost_without([o], "a") == []
    # a lost (unreachable) holder's present replica is still a replica
    assert lost_without([obj("x", ("a", DRAIN, False), ("d", RUN, True))], "a") == []
    # only the leaver holds it, or the other holder retired: it is lost
    alone = obj("x", ("a", DRAIN, False))
    assert lost_without([alone], "a") == [alone]
    gone = obj("x", ("a", DRAIN, False), ("c", RET, False), ("t", S.TERMINATED, False))
    assert lost_without([gone], "a") == [gone]
    assert lost_without([obj("x", ("a", DRAIN, False), durable=True)], "a") == []


def test_copies_go_to_running_instances_emptiest_first_never_to_a_holder():
    risky = [obj("big", ("a", DRAIN, False), size=100), obj("small", ("a", DRAIN, False), size=1)]
    rs = [Recipient("r1", bytes_held=50), Recipient("r2", bytes_held=0)]
    copies, stranded = plan_copies(risky, rs)
    assert [(c.sha256, c.recipient) for c in copies] == [("big", "r2"), ("small", "r1")]
    assert stranded == []


def test_no_recipient_strands_the_object():
    risky = [obj("x", ("a", DRAIN, False))]
    copies, stranded = plan_copies(risky, [])
    assert copies == [] and stranded == risky
    assert not may_retire(0, risky, force=False)
    assert may_retire(0, risky, force=True)
    assert not may_retire(1, [], force=True)  # live attempts always block


def test_an_object_with_a_copy_on_its_way_is_not_copied_twice():
    risky = [obj("x", ("a", DRAIN, False), pending=["r1"])]
    copies, stranded = plan_copies(risky, [Recipient("r1"), Recipient("r2")])
    assert copies == [] and stranded == []


@given(
    st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 4)), max_size=40), st.integers(0, 4)
)
def test_every_risky_object_gets_a_running_recipient_or_is_stranded(objs, n_recipients):
    risky = [obj(f"o{k}", ("leaving", DRAIN, False), size=size) for k, (size, _) in enumerate(objs)]
    rs = [Recipient(f"r{k}") for k in range(n_recipients)]
    copies, stranded = plan_copies(risky, rs)
    assert {c.sha256 for c in copies} | {o.sha256 for o in stranded} == {o.sha256 for o in risky}
    assert all(c.recipient in {r.instance_id for r in rs} for c in copies)
    assert (stranded == []) == (n_recipients > 0 or not risky)


def test_least_unique_data_retires_first():
    assert retire_first({"a": 500, "b": 0, "c": 20}, 2) == ["b", "c"]


def test_votes_need_consecutive_agreement():
    v = ScaleVote(None)
    for _ in range(3):
        v = vote(v, "down")
    assert v == ScaleVote("down", 3)
    assert vote(v, "up") == ScaleVote("up", 1)
    assert vote(v, None) == ScaleVote(None, 0)


def test_desired_size():
    assert desired_size(
        active=1, minimum=0, maximum=5, waiting_cpus=5, instance_cpus=2, idle=0
    ) == (4, "up")
    assert desired_size(
        active=5, minimum=0, maximum=5, waiting_cpus=5, instance_cpus=2, idle=0
    ) == (5, None)
    assert desired_size(
        active=4, minimum=1, maximum=5, waiting_cpus=0, instance_cpus=2, idle=4
    ) == (1, "down")
    assert desired_size(
        active=2, minimum=2, maximum=5, waiting_cpus=0, instance_cpus=2, idle=2
    ) == (2, None)


def test_a_copy_that_failed_goes_to_another_recipient_next_time():
    """Two hosts cut off from each other: the copy to the emptiest recipient failed,
    so the next plan sends it elsewhere at once; a recipient that failed just now is
    not asked again yet, and when every recipient failed, the one whose failure is
    oldest is tried (never the same dead end twice in a row)."""
    held = (Holder("a", DRAIN, False),)

    def plan(failed, recipients, now):
        o = ObjectInfo("x", 10, held, failed=failed)
        copies, stranded = plan_copies([o], recipients, now=now, retry_after=10)
        assert stranded == []
        return [c.recipient for c in copies]

    r = [Recipient("r1", 0), Recipient("r2", 50)]
    assert plan((("r1", 100.0),), r, now=101) == ["r2"]  # elsewhere, at once
    assert plan((("r1", 100.0), ("r2", 120.0)), r, now=125) == ["r1"]  # the older failure
    assert plan((("r1", 118.0), ("r2", 120.0)), r, now=125) == []  # both just failed: wait
    assert plan((("r1", 120.0),), [Recipient("r1")], now=125) == []  # the only place: wait
    assert plan((("r1", 100.0),), [Recipient("r1")], now=125) == ["r1"]  # then retry it
