"""Drain planning: which objects are at risk, where their copies go, and when an
instance may retire. Pure functions over snapshots the store passes in.

An object is safe when it has a present replica on a `running`, reachable instance
other than the one leaving, or a copy in durable storage. Only a verified replica
counts: `present` comes from an agent's own report of bytes it holds and hashed (and,
for an object that already had a verified copy elsewhere, a proof the server checked);
an `unverified` claim (a runner's finish, or a report not yet proven) never makes an
object safe, but an object the leaving instance only claims is still at risk. An
instance retires only when nothing of it is unsafe and no attempt of it is live;
recipients are always running, reachable instances, the emptiest first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from corral.domain.instances import InstanceState, accepts_replicas


class ObjectState(StrEnum):
    LIVE = "live"
    LOST = "lost"  # no replica anywhere (only ever after a forced retirement)


class ReplicaState(StrEnum):
    PENDING = "pending"  # a copy is ordered onto this instance
    PRESENT = "present"  # the instance holds it (its agent's own report, verified)
    UNVERIFIED = "unverified"  # claimed (a runner's finish, an unproven report), not trusted
    FAILED = "failed"  # the ordered copy failed
    MISSING = "missing"  # the instance no longer reports it
    DROPPED = "dropped"  # its instance retired


@dataclass(frozen=True)
class Holder:
    instance_id: str
    state: InstanceState
    lost: bool


@dataclass(frozen=True)
class ObjectInfo:
    sha256: str
    size: int
    holders: tuple[Holder, ...]  # instances with a present replica
    pending: tuple[str, ...] = ()  # instances a replica is on its way to
    durable: bool = False
    # (recipient, when) of copies of it that failed lately: a recipient that cannot
    # reach the holders (a partition between two hosts) is not asked first again
    failed: tuple[tuple[str, float], ...] = ()
    claims: tuple[str, ...] = ()  # instances with an unverified replica


def safe_without(obj: ObjectInfo, leaving: str) -> bool:
    """Would `obj` survive `leaving` going away?"""
    if obj.durable:
        return True
    return any(h.instance_id != leaving and accepts_replicas(h.state, h.lost) for h in obj.holders)


def still_held_without(obj: ObjectInfo, leaving: str) -> bool:
    """Does a present replica of `obj` remain anywhere once `leaving` goes away? A
    draining (or unreachable) holder still holds: its copy does not make the object
    safe, but it is not lost either. Only retired and terminated holders hold nothing."""
    if obj.durable:
        return True
    return any(
        h.instance_id != leaving
        and h.state not in (InstanceState.RETIRED, InstanceState.TERMINATED)
        for h in obj.holders
    )


def lost_without(objects: list[ObjectInfo], leaving: str) -> list[ObjectInfo]:
    """Objects held (or claimed) by `leaving` that a forced retirement of it loses for
    good: no present replica remains anywhere else."""
    return [
        o
        for o in objects
        if (any(h.instance_id == leaving for h in o.holders) or leaving in o.claims)
        and not still_held_without(o, leaving)
    ]


def at_risk(objects: list[ObjectInfo], leaving: str) -> list[ObjectInfo]:
    """Objects held (or claimed) by `leaving` that would be lost without it."""
    return [
        o
        for o in objects
        if (any(h.instance_id == leaving for h in o.holders) or leaving in o.claims)
        and not safe_without(o, leaving)
    ]


@dataclass
class Recipient:
    instance_id: str
    bytes_held: int = 0
    planned: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Copy:
    sha256: str
    recipient: str


def plan_copies(
    risky: list[ObjectInfo],
    recipients: list[Recipient],
    max_in_flight: int | None = None,
    *,
    now: float = 0.0,
    retry_after: float = 10.0,
) -> tuple[list[Copy], list[ObjectInfo]]:
    """One new replica for each object at risk that has none on its way, on the
    recipient holding the fewest bytes. A recipient whose copy of the object failed
    less than `retry_after` ago is not asked again yet, and one that failed at all
    comes after those that did not (oldest failure first): between two hosts that
    cannot reach each other the copy goes elsewhere, or waits. Returns (copies,
    objects with no recipient). `recipients` must already be filtered to running,
    reachable instances."""
    copies: list[Copy] = []
    stranded: list[ObjectInfo] = []
    in_flight = sum(1 for o in risky if o.pending)
    for obj in sorted(risky, key=lambda o: (-o.size, o.sha256)):
        if obj.pending:
            continue  # a copy is already on its way
        holders = {h.instance_id for h in obj.holders}
        options = [r for r in recipients if r.instance_id not in holders]
        if not options:
            stranded.append(obj)
            continue
        failed_at: dict[str, float] = {}
        for iid, when in obj.failed:
            failed_at[iid] = max(when, failed_at.get(iid, when))
        options = [
            r
            for r in options
            if r.instance_id not in failed_at or now - failed_at[r.instance_id] >= retry_after
        ]
        if not options:
            continue  # every recipient failed just now: try again in a moment
        if max_in_flight is not None and in_flight >= max_in_flight:
            break
        best = min(
            options,
            key=lambda r: (
                r.instance_id in failed_at,
                failed_at.get(r.instance_id, 0.0),
                r.bytes_held,
                r.instance_id,
            ),
        )
        best.bytes_held += obj.size
        best.planned.append(obj.sha256)
        copies.append(Copy(obj.sha256, best.instance_id))
        in_flight += 1
    return copies, stranded


def may_retire(live_attempts: int, risky: list[ObjectInfo], force: bool) -> bool:
    if live_attempts:
        return False
    return force or not risky


def retire_first(unique_bytes: dict[str, int], count: int) -> list[str]:
    """Which instances to retire when shrinking by `count`: least unique data first."""
    return [i for i, _ in sorted(unique_bytes.items(), key=lambda kv: (kv[1], kv[0]))][:count]


# ---- autoscaling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleVote:
    direction: str | None  # "up", "down" or None
    count: int = 0


def vote(previous: ScaleVote, direction: str | None) -> ScaleVote:
    """Consecutive checks that agree on a direction; any disagreement resets."""
    if direction is None:
        return ScaleVote(None, 0)
    if previous.direction == direction:
        return ScaleVote(direction, previous.count + 1)
    return ScaleVote(direction, 1)


def desired_size(
    *, active: int, minimum: int, maximum: int, waiting_cpus: float, instance_cpus: float, idle: int
) -> tuple[int, str | None]:
    """What the fleet's size should be now, and which way that moves it."""
    if waiting_cpus > 0 and active < maximum:
        need = int(-(-waiting_cpus // max(instance_cpus, 1e-9)))  # ceil
        return min(maximum, active + max(1, need)), "up"
    if idle > 0 and active > minimum and waiting_cpus <= 0:
        return max(minimum, active - idle), "down"
    return max(minimum, min(active, maximum)), None
