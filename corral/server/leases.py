"""Lease renewals batched in memory, flushed in one statement per tick.

A heartbeat that changes nothing (see `corral.domain.heartbeat.needs_exchange`) does
not open a write transaction: it records its renewal here, keyed by instance (a later
renewal replaces an earlier one), and `flush_leases` writes every pending renewal in
one UPDATE (an executemany) about once a second, before the reaper judges, and at
shutdown. The reaper also skips an instance whose renewal is still pending here (it
arrived after the flush), so no renewal heard by this server is ever judged missing.
Other servers see a renewal at most one flush period late, far less than any grace.

Credentials' recorded uses (`tokens.last_used_at`, at most once a minute per token)
are written by the same flush instead of a write transaction of their own.

Also kept per instance: the last full exchange that ordered nothing (`LastExchange`),
which the next heartbeat compares itself with."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from corral.api import HeartbeatRequest
from corral.domain.heartbeat import LastExchange
from corral.store.instances import Renewal, renew_leases
from corral.store.tokens import touch_many

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
        self.uses: dict[str, float] = {}  # token id -> last use, not yet written

    def used(self, token_id: str, at: float) -> None:
        """A credential was used (recorded at most about once a minute per token)."""
        self.uses[token_id] = max(at, self.uses.get(token_id, at))

    def renew(self, renewal: Renewal) -> None:
        prev = self.pending.get(renewal.instance_id)
        if prev is None or prev.heard_at <= renewal.heard_at:
            self.pending[renewal.instance_id] = renewal

    def is_pending(self, instance_id: str) -> bool:
        return instance_id in self.pending

    def take(self) -> tuple[list[Renewal], dict[str, float]]:
        taken, self.pending = list(self.pending.values()), {}
        uses, self.uses = self.uses, {}
        return taken, uses

    def restore(self, taken: list[Renewal], uses: dict[str, float]) -> None:
        """A flush failed: what it held is pending again (newer ones win)."""
        for r in taken:
            self.renew(r)
        for token_id, at in uses.items():
            self.used(token_id, at)

    def forget(self, instance_id: str) -> None:
        """A new incarnation registered: what the old one reported says nothing."""
        self.last.pop(instance_id, None)


async def flush_leases(ctx: ServerContext) -> bool:
    """Write every pending renewal in one statement, and the credentials' recorded
    uses in another, in one transaction (a server loop body)."""
    taken, uses = ctx.leases.take()
    if not taken and not uses:
        return False

    async def write(conn) -> None:
        await renew_leases(conn, taken)
        await touch_many(conn, uses)

    try:
        await ctx.db.transact(write)
    except BaseException:
        ctx.leases.restore(taken, uses)
        raise
    return False
