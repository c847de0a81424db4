"""What every request handler and background loop of one server shares."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from corral.server.config import ServerConfig
from corral.server.notify import Notifier
from corral.store.db import Database

if TYPE_CHECKING:
    from corral.backends.base import Backend


@dataclass
class ServerContext:
    config: ServerConfig
    db: Database
    server_id: str
    notifier: Notifier = field(default_factory=Notifier)
    clock: Callable[[], float] = time.time
    backends: dict[str, "Backend"] = field(default_factory=dict)
    started_at: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def now(self) -> float:
        return self.clock()

    def recheck(self, remaining: float) -> float:
        """How long a waiter may sleep on in-process wake-ups alone. With SQLite every
        write happens in this process; on PostgreSQL another server may write, so
        waiters look at the database again every half second."""
        return min(remaining, 0.5) if self.db.is_postgres else remaining


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx
