"""Server settings. Defaults suit a real fleet; tests shorten the timings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import corral
from corral import default_data_dir

DEFAULT_PORT = 8470


@dataclass
class ServerConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    db_url: str | None = None  # None: SQLite in the data dir
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # what this server reports as its build (servers of different builds are flagged)
    build_version: str = field(
        default_factory=lambda: os.environ.get("CORRAL_BUILD_VERSION", corral.__version__)
    )
    heartbeat_base: float = 2.0  # seconds between one agent's heartbeats, small fleets
    heartbeat_max_rate: float = 50.0  # heartbeats per second the whole fleet may send
    # the exchange interval grows with the fleet up to this once agents renew their
    # lease between exchanges (liveness no longer waits for exchanges; without
    # renewals it stays capped at 30 s: domain.heartbeat.pacing)
    heartbeat_ceiling: float = 300.0
    # between exchanges agents renew their lease with a tiny request, paced like the
    # exchanges at a higher fleet-wide rate, never rarer than the ceiling; only when
    # exchanges come rarer than that (fleets above ~100 agents by default)
    lease_base: float = 2.0
    lease_max_rate: float = 3000.0
    lease_ceiling: float = 4.0
    # silence after which an instance counts as lost, at least: the grace grows with the
    # interval each agent renews its lease at (domain.heartbeat.grace_period): 3
    # renewals + 1 s; with the defaults at most 11 s up to 10,000 agents per server
    agent_grace: float = 10.0
    start_timeout: float = 60.0  # an issued attempt must start within this
    attempt_grace: float = 60.0  # a running attempt's runner must be heard from within this
    dispatch_interval: float = 1.0
    reaper_interval: float = 1.0
    lease_flush_interval: float = 1.0  # batched lease renewals are written this often
    # a heartbeat that reports nothing new skips the exchange (only renews its lease) for
    # at most this long after the last full one (time-driven decisions: at most this
    # late), or a few exchange intervals when those are longer
    # (domain.heartbeat.full_exchange_every)
    heartbeat_full_every: float = 10.0
    presence_interval: float = 5.0
    server_grace: float = 30.0  # a server unseen this long counts as gone
    reconcile_interval: float = 2.0
    install_backoff: float = 30.0  # first retry of an install order after this; doubles
    install_backoff_max: float = 3600.0
    install_cap: int = 5  # orders per instance and target before install_failed
    drain_interval: float = 1.0
    drain_grace: float = 600.0  # a draining instance's attempts are requeued after this
    transfer_timeout: float = 600.0  # a copy not done by then is ordered again elsewhere
    retire_grace: float = 5.0  # between retirement and termination: the agent exits first
    # provisioning machines (ssh fleets): retries back off from this, double, stop at
    # the cap; a started agent must register within register_timeout
    provision_backoff: float = 10.0
    provision_backoff_max: float = 600.0
    provision_cap: int = 5
    register_timeout: float = 120.0
    provision_timeout: float = 900.0  # one try (connect, install, start) at most
    autoscale_interval: float = 5.0
    autoscale_checks: int = 3  # consecutive checks that must agree before scaling
    public_url: str | None = None
    tls_cert: Path | None = None  # with tls_key: serve https (PEM files)
    tls_key: Path | None = None
    # the key that seals secrets at rest (None: DATA_DIR/secret.key, made on first start)
    secret_key: str | None = field(
        default_factory=lambda: os.environ.get("CORRAL_SECRET_KEY") or None, repr=False
    )
    public_metrics: bool = False  # /metrics and /docs without a token (--public-metrics)
    # agent exchanges (register, heartbeat) using the database at once, and waiting for
    # it (at most agent_queue, expecting to wait at most agent_max_wait s); beyond,
    # 503 with Retry-After (server/loadgate.py). 0 slots: half the database pool. The
    # expected wait is kept short: an answer within about 0.1 s, or at once a 503 that
    # the agent waits out (its liveness does not depend on being served meanwhile);
    # a queue of seconds made every agent's exchange, and every submit behind them in
    # the database, seconds late. A registration may expect to wait longer
    # (agent_register_max_wait): a storm of them is served fastest from a queue. One
    # that already waited agent_max_age s in the server before reaching the gate (the
    # event loop behind) is refused too.
    agent_slots: int = 0
    agent_queue: int = 200
    agent_max_wait: float = 0.1
    agent_register_max_wait: float = 2.0
    agent_max_age: float = 2.0

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'corral.db').resolve()}"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for name in (
            "heartbeat_base",
            "agent_grace",
            "start_timeout",
            "attempt_grace",
            "dispatch_interval",
            "reaper_interval",
            "lease_flush_interval",
            "presence_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")


def password_in_arguments(db_url: str, argv: list[str]) -> bool:
    """Whether the password of `db_url` appears on a command line (argv), which any
    process on the host may read."""
    try:
        password = urlsplit(db_url).password
    except ValueError:
        return False
    return password is not None and password != "" and any(password in arg for arg in argv)
