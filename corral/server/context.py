"""What every request handler and background loop of one server shares."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from corral.domain.heartbeat import Observation, Pacing
from corral.domain.providers import Backend
from corral.domain.provisioning import ProvisionPolicy
from corral.domain.reconcile import InstallPolicy
from corral.server.config import ServerConfig
from corral.server.issued import IssuedTokens
from corral.server.leases import Leases
from corral.server.loadgate import LoadGate
from corral.server.notify import Notifier
from corral.store.db import Database
from corral.store.sqlite_lock import SqliteServerLock

HealthProvider = Callable[["ServerContext"], Awaitable[list[dict[str, Any]]]]


@dataclass
class ServerContext:
    config: ServerConfig
    db: Database
    server_id: str
    admin_token: str = ""
    join_token: str = ""
    install_policy: InstallPolicy = field(default_factory=InstallPolicy)
    notifier: Notifier = field(default_factory=Notifier)
    clock: Callable[[], float] = time.time
    backends: dict[str, Backend] = field(default_factory=dict)
    provision_policy: ProvisionPolicy = field(default_factory=ProvisionPolicy)
    provisioning: dict[str, asyncio.Task] = field(default_factory=dict)  # instance id -> try
    started_at: float = 0.0
    sqlite_lock: SqliteServerLock | None = None
    health_providers: list[HealthProvider] = field(default_factory=list)
    stopping: bool = False  # set on the first SIGINT/SIGTERM: place nothing more
    pacing: tuple[Pacing, float] | None = None  # what agents are told, and when computed
    observation: Observation | None = None  # when the reaper could last observe (reaper.py)
    agent_gate: LoadGate | None = None  # admission of agent exchanges (made on first use)
    leases: Leases = field(default_factory=Leases)  # renewals not yet written (leases.py)
    drains_seen: set[str] = field(default_factory=set)  # draining instances woken once
    issued_tokens: IssuedTokens = field(default_factory=IssuedTokens)  # known to the guard
    explained_at: float = float("-inf")  # the dispatcher's last pass that explained waits

    def gate(self) -> LoadGate:
        if self.agent_gate is None:
            slots = self.config.agent_slots or self.db.pool_size // 2 or 1
            self.agent_gate = LoadGate(
                slots,
                self.config.agent_queue,
                self.config.agent_max_wait,
                self.config.agent_max_age,
                self.config.agent_register_max_wait,
            )
        return self.agent_gate

    def now(self) -> float:
        return self.clock()

    def recheck(self, remaining: float) -> float:
        """How long a waiter may sleep on wake-ups alone. With SQLite every write
        happens in this process; on PostgreSQL another server may write, and its
        wake-ups arrive by LISTEN/NOTIFY (corral.store.wakebus) while that channel is
        up; while it is down waiters look at the database again every half second."""
        if self.db.is_postgres and not self.notifier.cross_server:
            return min(remaining, 0.5)
        return remaining


async def get_ctx(request: Request) -> ServerContext:
    # async: FastAPI runs a plain `def` dependency in a worker thread on every request
    ctx: ServerContext = request.app.state.ctx
    return ctx
