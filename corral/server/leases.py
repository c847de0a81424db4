"""Lease renewals batched in memory, flushed in one statement per tick.

A heartbeat that changes nothing (see `corral.domain.heartbeat.needs_exchange`) does
not open a write transaction: it records its renewal here, keyed by instance (a later
renewal replaces an earlier one), and `flush_leases` writes every pending renewal in
one UPDATE (an executemany) about once a second, before the reaper judges, and at
shutdown. The reaper also skips an instance whose renewal is still pending here (it
arrived after the flush), so no renewal heard by this server is ever judged missing.
Other servers see a renewal at most one flush period late, far less than any grace.

Also kept per instance: the last full exchange that ordered nothing (`LastExchange`),
which the next heartbeat compares itself with."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from corral.api import HeartbeatRequest
from corral.domain.heartbeat import LastExchange
from corral.store.instances import Renewal, renew_leases

if TYPE_CHECKING:
    from corral.server.context import ServerContext


def body_digest(body: HeartbeatRequest) -> bytes:
    """What the agent reported, without how long it is willing to wait."""
    raw = body.model_dump_json(exclude={"wait"}).encode()
    return hashlib.blake2b(raw, digest_size=16).digest()


class Leases:
    def __init__(self) -> None:
        self.pending: dict[str, Renewal] = {}
        self.last: dict[str, LastExchange] = {}

    def renew(self, renewal: Renewal) -> None:
        prev = self.pending.get(renewal.instance_id)
        if prev is None or prev.heard_at <= renewal.heard_at:
            self.pending[renewal.instance_id] = renewal

    def is_pending(self, instance_id: str) -> bool:
        return instance_id in self.pending

    def take(self) -> list[Renewal]:
        taken, self.pending = list(self.pending.values()), {}
        return taken

    def restore(self, taken: list[Renewal]) -> None:
        """A flush failed: its renewals are pending again (newer ones win)."""
        for r in taken:
            self.renew(r)

    def forget(self, instance_id: str) -> None:
        """A new incarnation registered: what the old one reported says nothing."""
        self.last.pop(instance_id, None)


async def flush_leases(ctx: ServerContext) -> bool:
    """Write every pending renewal in one statement (a server loop body)."""
    taken = ctx.leases.take()
    if not taken:
        return False
    try:
        await ctx.db.transact(renew_leases, taken)
    except BaseException:
        ctx.leases.restore(taken)
        raise
    return False
