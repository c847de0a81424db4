"""Every Prometheus metric corral exposes, in one place (prefix `corral_`).

Two kinds:
- counters and histograms of what this server process did (attempts it recorded,
  dispatch passes it ran, heartbeats it handled, ...), updated at the call sites with
  one-liners;
- gauges of fleet-wide state (jobs by state and fleet, agents by state, install
  orders and failures, bytes replicated and offloaded), computed from the shared
  database at scrape time by `StateCollector`, so that every server of a
  multi-server deployment reports the same, true figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from corral.store.metrics import Snapshot

__all__ = ["CONTENT_TYPE_LATEST"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_WAIT = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)

JOBS_SUBMITTED = Counter("corral_jobs_submitted", "Jobs submitted to this server", ["fleet"])
ATTEMPTS_STARTED = Counter("corral_attempts_started", "Attempts whose command started")
ATTEMPTS_FINISHED = Counter(
    "corral_attempts_finished",
    "Attempts that ended, by outcome (succeeded, failed, lost)",
    ["outcome"],
)
RELAYED_REPORTS = Counter(
    "corral_relayed_attempt_reports",
    "Runners' attempt reports that reached this server through their agent's relay, by action",
    ["action"],
)
SUBMIT_TO_START = Histogram(
    "corral_submit_to_start_seconds",
    "Time from a job's submission to the start of its first attempt",
    buckets=_WAIT,
)
DISPATCH_PASS = Histogram(
    "corral_dispatch_pass_seconds", "Duration of one dispatcher pass", buckets=_LATENCY
)
PLACEMENTS = Counter("corral_dispatch_placements", "Attempts placed on instances")
HEARTBEATS_BATCHED = Counter(
    "corral_heartbeats_batched",
    "Heartbeats that reported nothing new: their lease renewal was batched, no exchange ran",
)
LEASE_RENEWALS = Counter(
    "corral_lease_renewals",
    "Lease renewals between exchanges (POST /api/v1/agents/lease) that renewed a lease",
)
HEARTBEAT = Histogram(
    "corral_heartbeat_handling_seconds",
    "Time to handle one agent heartbeat exchange (its database transaction, not the long-poll)",
    buckets=_LATENCY,
)
HTTP_REQUESTS = Counter(
    "corral_http_requests", "Requests this server received, by route (module.function)", ["route"]
)
AGENT_REFUSED = Counter(
    "corral_agent_exchanges_refused", "Agent registrations and heartbeats refused (503: busy)"
)
INSTALL_ORDERS = Counter(
    "corral_install_orders_sent", "Install orders sent to agents by this server", ["component"]
)
REPLICATION_ORDERS = Counter(
    "corral_replication_ordered_bytes", "Bytes this server ordered copied between instances"
)
OFFLOAD_CONFIRMED = Counter(
    "corral_offload_confirmed_bytes",
    "Bytes this server confirmed in a fleet's durable store",
)
DRAIN_DURATION = Histogram(
    "corral_drain_duration_seconds",
    "Time from a drain request to the instance's retirement",
    buckets=(1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600),
)
DATABASE_ERRORS = Counter(
    "corral_database_errors", "Database errors, by where they happened", ["where"]
)
BUILD_INFO = Gauge("corral_build_info", "This server's build", ["version", "server_id"])

# the dashboard's heartbeat chart: per minute of the last hour, (sum of seconds, count)
# of the heartbeats this server handled; bounded whatever the heartbeat rate
HEARTBEAT_MINUTES: dict[int, tuple[float, int]] = {}


def observe_heartbeat(seconds: float, now: float | None = None) -> None:
    HEARTBEAT.observe(seconds)
    minute = int((time.time() if now is None else now) // 60)
    total, count = HEARTBEAT_MINUTES.get(minute, (0.0, 0))
    HEARTBEAT_MINUTES[minute] = (total + seconds, count + 1)
    if len(HEARTBEAT_MINUTES) > 62:
        for old in sorted(HEARTBEAT_MINUTES)[:-61]:
            del HEARTBEAT_MINUTES[old]


def heartbeat_minutes() -> list[tuple[float, float, int]]:
    """(minute start, sum of seconds, count) of the heartbeats handled lately."""
    return [(m * 60.0, total, n) for m, (total, n) in sorted(HEARTBEAT_MINUTES.items())]


class StateCollector(Collector):
    """Gauges of one database snapshot, plus the connection pool of this server."""

    def __init__(self, snap: Snapshot, pool=None, statements: int | None = None):
        self.snap = snap
        self.pool = pool
        self.statements = statements

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.snap
        g = GaugeMetricFamily("corral_jobs", "Jobs by state and fleet", labels=["state", "fleet"])
        for (state, fleet), n in sorted(s.jobs.items()):
            g.add_metric([state, fleet], n)
        yield g
        g = GaugeMetricFamily("corral_attempts", "Job attempts by state", labels=["state"])
        for state, n in sorted(s.attempts.items()):
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "corral_agents",
            "Instances (agents) by state; lost=true when heartbeats stopped",
            labels=["state", "lost"],
        )
        for (state, lost), n in sorted(s.agents.items()):
            g.add_metric([state, "true" if lost else "false"], n)
        yield g
        g = GaugeMetricFamily(
            "corral_install_orders",
            "Install orders ever sent, all servers, by component (from the database)",
            labels=["component"],
        )
        for comp, n in sorted(s.install_orders.items()):
            g.add_metric([comp], n)
        yield g
        g = GaugeMetricFamily(
            "corral_install_failures",
            "Instances whose install of a component failed past its cap",
            labels=["component"],
        )
        for comp, n in sorted(s.install_failures.items()):
            g.add_metric([comp], n)
        yield g
        yield GaugeMetricFamily(
            "corral_replicated_bytes",
            "Bytes of outputs copied to another instance by a replication order, held now",
            value=s.replicated_bytes,
        )
        yield GaugeMetricFamily(
            "corral_offloaded_bytes",
            "Bytes of outputs held in a fleet's durable store",
            value=s.offloaded_bytes,
        )
        if self.pool is not None:
            g = GaugeMetricFamily(
                "corral_db_pool_connections",
                "This server's database connections, by use",
                labels=["use"],
            )
            g.add_metric(["checked_out"], self.pool.checkedout())
            g.add_metric(["idle"], self.pool.checkedin())
            yield g
            yield GaugeMetricFamily(
                "corral_db_pool_size", "Configured size of the pool", value=self.pool.size()
            )
        if self.statements is not None:
            yield CounterMetricFamily(
                "corral_db_statements",
                "Statements this server process sent to the database",
                value=self.statements,
            )


def exposition(snap: Snapshot | None, pool=None, statements: int | None = None) -> bytes:
    """The text a scrape gets: this process's metrics, then the database's gauges."""
    out = generate_latest(REGISTRY)
    if snap is not None:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(StateCollector(snap, pool, statements))
        out += generate_latest(reg)
    return out
