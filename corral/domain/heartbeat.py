"""Heartbeat pacing: the interval grows with fleet size so total load stays capped."""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from corral.domain.instances import InstanceState


def heartbeat_interval(
    fleet_size: int, base: float = 2.0, max_per_second: float = 50.0, ceiling: float = 30.0
) -> float:
    """Seconds between heartbeats of one agent.

    With `fleet_size` agents the server sees at most `max(fleet_size / interval)` =
    `max_per_second` heartbeats a second, never less often than `base` each, never
    rarer than `ceiling`.
    """
    if fleet_size < 0:
        raise ValueError("fleet_size must be >= 0")
    interval = max(base, fleet_size / max_per_second)
    return min(max(interval, base), max(ceiling, base))


def lease_interval(
    fleet_size: int, exchange_interval: float, base: float, max_per_second: float, ceiling: float
) -> float | None:
    """Seconds between one agent's lease renewals (tiny liveness requests sent between
    exchanges), or None when its exchanges come as often (a small fleet: every exchange
    renews the lease). Paced like the exchanges, at a higher fleet-wide rate and a low
    ceiling, so a silent agent is found within a few of them at any fleet size."""
    every = heartbeat_interval(fleet_size, base, max_per_second, ceiling)
    return every if every < exchange_interval else None


@dataclass(frozen=True)
class Pacing:
    """What a server tells its agents: exchange every `interval` seconds (a held
    long-poll), and renew the lease every `lease` seconds between exchanges (None:
    the exchanges are often enough)."""

    interval: float
    lease: float | None


# The exchange interval's ceiling when agents renew their lease between exchanges:
# liveness then rides on the renewals (whose own ceiling bounds detection), so the
# exchange interval keeps growing with the fleet up to this instead of the 30 s that
# bounds it when exchanges are all the liveness there is.
EXCHANGE_CEILING = 300.0
EXCHANGE_CEILING_WITHOUT_LEASES = 30.0


def pacing(
    fleet_size: int,
    *,
    base: float,
    max_per_second: float,
    lease_base: float,
    lease_max_per_second: float,
    lease_ceiling: float,
    ceiling: float = EXCHANGE_CEILING,
) -> Pacing:
    """What agents are told at this fleet size. Exchanges come at most
    `max_per_second` a second fleet-wide (each agent's interval grows with the fleet
    up to `ceiling`); once they come rarer than the renewals would, renewals carry
    liveness in between. Without renewals the exchange interval is capped at
    EXCHANGE_CEILING_WITHOUT_LEASES, as it always was."""
    interval = heartbeat_interval(fleet_size, base, max_per_second, ceiling)
    lease = lease_interval(fleet_size, interval, lease_base, lease_max_per_second, lease_ceiling)
    if lease is None:
        interval = min(interval, max(EXCHANGE_CEILING_WITHOUT_LEASES, base))
    return Pacing(interval, lease)


# A full exchange runs at least once per this many exchange intervals even when the
# agent reports nothing new (time-driven decisions, e.g. an install's backoff); the
# agent sends its whole object list at least once per OBJECTS_REFRESH_INTERVALS.
FULL_EVERY_INTERVALS = 3.0
OBJECTS_REFRESH_INTERVALS = 10.0
OBJECTS_REFRESH_MIN = 30.0


def full_exchange_every(interval: float, configured: float) -> float:
    """How long after a full exchange an unchanged report may still skip one: the
    configured period, stretched to a few exchange intervals so that at scale (long
    intervals) most exchanges that report nothing new stay cheap. With the period
    shorter than the interval every exchange would be a full one. A configured 0
    turns the skipping off (every exchange is a full one)."""
    if configured <= 0:
        return 0.0
    return max(configured, FULL_EVERY_INTERVALS * interval)


def objects_refresh(interval: float) -> float:
    """How often an agent sends its whole object list though nothing changed (a
    refresh, not news: a changed list goes up at once). A list forces a full exchange,
    so it is stretched with the exchange interval like `full_exchange_every`."""
    return max(OBJECTS_REFRESH_MIN, OBJECTS_REFRESH_INTERVALS * interval)


# Each reply tells an interval shortened by up to this share of the fleet's, at random.
INTERVAL_SPREAD = 0.2


def told_interval(interval: float, key: str, now: float) -> float:
    """The interval one reply tells one agent (`key`) at `now`: the fleet's, shortened
    by a random share up to INTERVAL_SPREAD. Agents whose replies left together (a
    registration storm, or a burst a busy server served from one queue) would otherwise
    come back together for ever, each burst re-forming the next; told a little less at
    random each time, they drift apart within a few intervals. Never longer than the
    fleet's, so the grace derived from it holds (exchanges come up to 1/(1 -
    INTERVAL_SPREAD) as often as the pacing's rate, 11% more on average). Drawn from a
    hash of the agent and the time, so the simulator replays it."""
    digest = hashlib.blake2b(f"{key}/{now!r}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return interval * (1 - INTERVAL_SPREAD * u)


def renewal_interval(exchange_interval: float, lease: float | None) -> float:
    """How often an agent renews its lease: its pings' interval when it pings, else
    its exchanges'. The grace (grace_period) is derived from this."""
    return exchange_interval if lease is None else min(exchange_interval, lease)


def grace_period(interval: float, configured: float) -> float:
    """How long an agent may be silent before it counts as lost: at least three
    intervals, so one slow heartbeat never costs a job."""
    return max(configured, 3 * interval + 1.0)


def is_lost(last_heartbeat_at: float | None, now: float, grace: float) -> bool:
    if last_heartbeat_at is None:
        return False
    return now - last_heartbeat_at > grace and not math.isnan(last_heartbeat_at)


# ---- silence the server could not observe ----------------------------------------------------

# The longest an agent (or runner) waits between two tries to reach a server: its
# reconnect backoff's ceiling (corral.agent.daemon.RECONNECT, corral.agent.upstream.RETRY
# must stay within it). After an outage of the server's own database or event loop, an
# agent needs up to this long to notice the server is back.
AGENT_RETRY_CEILING = 10.0


def unobserved(
    since: float, now: float, outages: Sequence[tuple[float, float]], recovery: float
) -> float:
    """Seconds of [since, now] the server could not observe: each outage (start, end)
    of its own, widened by `recovery` after its end (the time agents retrying with
    backoff need to reach it again). Overlapping outages count once."""
    spans = sorted((max(s, since), min(e + recovery, now)) for s, e in outages)
    total, reach = 0.0, since
    for start, end in spans:
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


def observed_silence(
    last_heard: float, now: float, outages: Sequence[tuple[float, float]], recovery: float
) -> float:
    """How long the server could have heard from an agent since `last_heard` and did not."""
    return (now - last_heard) - unobserved(last_heard, now, outages, recovery)


def is_silent_too_long(
    last_heard: float | None,
    now: float,
    grace: float,
    outages: Sequence[tuple[float, float]] = (),
    recovery: float = AGENT_RETRY_CEILING,
) -> bool:
    """`is_lost` with every deadline extended by the silence the server could not observe."""
    if last_heard is None or math.isnan(last_heard):
        return False
    return observed_silence(last_heard, now, outages, recovery) > grace


@dataclass
class Observation:
    """When this server could last observe its agents: the end of its last database
    round trip that worked (the reaper's), and the gaps between them longer than
    `tolerance` (its database, or its own event loop, was unavailable). Pure: the
    caller passes the time in."""

    tolerance: float
    last_ok: float | None = None
    outages: list[tuple[float, float]] = field(default_factory=list)
    keep: int = 100  # outages remembered, at most
    horizon: float = 3600.0  # ... and only those that ended this recently

    def gaps(self, now: float) -> list[tuple[float, float]]:
        """The outages to allow for at `now`, counting the current gap as one (the
        server is only now observing again)."""
        last = self.last_ok
        if last is not None and now - last > self.tolerance:
            return [*self.outages, (last, now)]
        return list(self.outages)

    def observed(self, now: float, done: float | None = None) -> tuple[float, float] | None:
        """A round trip that started at `now` (and ended at `done`) worked; returns the
        gap it ended, if that was an outage. Gaps run from the end of one round trip
        that worked to the start of the next, so a slow database (long round trips,
        ticks on time) is not mistaken for an unavailable one."""
        gap = None
        if self.last_ok is not None and now - self.last_ok > self.tolerance:
            gap = (self.last_ok, now)
            self.outages = [*self.outages, gap]
        self.outages = [o for o in self.outages if o[1] > now - self.horizon][-self.keep :]
        end = now if done is None else max(now, done)
        self.last_ok = end if self.last_ok is None else max(self.last_ok, end)
        return gap

    def extension(self, now: float, recovery: float = AGENT_RETRY_CEILING) -> float:
        """The most any deadline can be extended by now (for a coarse query cutoff)."""
        return unobserved(-math.inf, now, self.gaps(now), recovery)


# ---- when a heartbeat may skip the exchange ---------------------------------------------------


@dataclass(frozen=True)
class LastExchange:
    """What this server knows of an instance's last exchange that ordered nothing, or
    only starts: the digest of the report expected next (the one it answered, or that
    one with the starts taken), the instance's wake generations before it ran (all
    wake-ups, and those that came with a placement on it), when the last full look ran,
    and the instance state it replied."""

    digest: bytes
    generation: int
    placed_generation: int
    at: float
    state: InstanceState


class Look(enum.Enum):
    """What a heartbeat's exchange must look at."""

    NONE = "none"  # nothing: its lease renewal is buffered, no transaction
    PLACEMENTS = "placements"  # only the jobs placed on the instance since
    FULL = "full"  # everything


def look_needed(
    last: LastExchange | None,
    digest: bytes,
    generation: int,
    placed_generation: int,
    now: float,
    full_every: float,
    wakes_trusted: bool = True,
    lists_objects: bool = False,
) -> Look:
    """What must this heartbeat's exchange look at?

    Nothing only when the agent reports exactly what the last exchange expected (same
    digest), nothing woke the instance since (every change for an instance wakes it,
    from any server while wake-ups cross servers: `wakes_trusted`), and the last full
    look ran less than `full_every` seconds ago (decisions driven by time alone, such as
    an install's backoff, are taken at most that late). The jobs placed on it only, when
    the same holds but for wake-ups that each came with a placement by this server
    (`placed_generation` moved as much as `generation`). A report that lists its objects
    (`lists_objects`: a first report or a refresh) always gets the full look; one that
    says they are unchanged matches the last exchange's (the digest leaves the object
    list out). Anything uncertain gets the full look."""
    if last is None or not wakes_trusted or lists_objects or digest != last.digest:
        return Look.FULL
    if not (0.0 <= now - last.at < full_every):
        return Look.FULL
    woken = generation - last.generation
    if woken == 0:
        return Look.NONE
    if only_placements(woken, placed_generation - last.placed_generation):
        return Look.PLACEMENTS
    return Look.FULL


def only_placements(woken: int, placed: int) -> bool:
    """Whether `woken` wake-ups of an instance were all placements on it: the
    dispatcher wakes both keys at once, anything else moves only the instance's, so
    the two counts, taken over the same span, are equal exactly then."""
    return woken == placed
