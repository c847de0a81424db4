"""Heartbeat pacing: the interval grows with fleet size so total load stays capped."""

from __future__ import annotations

import math


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


def grace_period(interval: float, configured: float) -> float:
    """How long an agent may be silent before it counts as lost: at least three
    intervals, so one slow heartbeat never costs a job."""
    return max(configured, 3 * interval + 1.0)


def is_lost(last_heartbeat_at: float | None, now: float, grace: float) -> bool:
    if last_heartbeat_at is None:
        return False
    return now - last_heartbeat_at > grace and not math.isnan(last_heartbeat_at)
