"""Lease renewals batched in memory, flushed in one statement per tick.

A heartbeat that changes nothing (see `corral.domain.heartbeat.look_needed`) does
not open a write transaction: it records its renewal here, keyed by instance (a later
renewal replaces an earlier one), and `flush_leases` writes every pending renewal in
one UPDATE (an executemany) about once a second, before the reaper judges, and at
shutdown. The reaper also skips an instance whose renewal is still pending here (it
arrived after the flush), so no renewal heard by this server is ever judged missing.
Other servers see a renewal at most one flush period late, far less than any grace.

Credentials' recorded uses (`tokens.last_used_at`, at most once a minute per token)
are written by the same flush instead of a write transaction of their own.

Also kept per instance: the last full exchange that ordered nothing (`LastExchange`),
which the next heartbeat compares itself with; and, for agents told to renew their
lease between exchanges, what a renewal request (`POST /api/v1/agents/lease`, served
by `corral.server.lease_route` before the web framework) is checked against: the
credential and incarnation of the agent's last exchange on this server, and the wake
generation then. A renewal that does not match gets "exchange first": the agent then
runs a full exchange, which admits it again. A renewal touches no database."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.api import HeartbeatRequest
from corral.domain.heartbeat import LastExchange, Pacing, pacing
from corral.store import instances
from corral.store.instances import Renewal, renew_leases
from corral.store.tokens import touch_many

if TYPE_CHECKING:
    from corral.server.config import ServerConfig
    from corral.server.context import ServerContext


def body_digest(body: HeartbeatRequest) -> bytes:
    """What the agent reported, without how long it is willing to wait and without
    its object list (a report that lists its objects always runs the exchange; one
    that says they are unchanged reports what the last exchange got)."""
    raw = body.model_dump_json(exclude={"wait", "objects"}).encode()
    return hashlib.blake2b(raw, digest_size=16).digest()


def configured_pacing(cfg: ServerConfig, fleet_size: int) -> Pacing:
    """What a server with this configuration tells agents at this fleet size."""
    return pacing(
        fleet_size,
        base=cfg.heartbeat_base,
        max_per_second=cfg.heartbeat_max_rate,
        lease_base=cfg.lease_base,
        lease_max_per_second=cfg.lease_max_rate,
        lease_ceiling=cfg.lease_ceiling,
        ceiling=cfg.heartbeat_ceiling,
    )


async def current_pacing(ctx: ServerContext) -> Pacing:
    """What agents are told now (recomputed from the fleet's size every 10 s)."""
    cached = ctx.pacing
    now = ctx.now()
    if cached and now - cached[1] < 10:
        return cached[0]
    pace = configured_pacing(ctx.config, await ctx.db.query(instances.count_live))
    ctx.pacing = (pace, now)
    return pace


def instance_key(instance_id: str) -> tuple[str, str]:
    """The wake-up key of an instance (corral.server.notify): every change that gives
    it something to do wakes it."""
    return ("instance", instance_id)


def deliveries_key(instance_id: str) -> str:
    """Woken together with `instance_key` when this server placed jobs on the instance,
    and only then: a held exchange woken by placements alone looks only for them (see
    corral.server.api.agents.woken_by_placements). A plain string, so it stays on this
    server (corral.server.notify): another server's placement arrives as the instance's
    key alone, and its exchange looks at everything, as does any wake-up whose cause it
    cannot tell."""
    return f"deliveries {instance_id}"


@dataclass(frozen=True)
class Pinger:
    """An agent this server lets renew its lease without an exchange: what its last
    full exchange here established."""

    incarnation: int
    generation: int  # the instance's wake generation before that exchange ran
    until: float  # renewals accepted until then; later, an exchange first
    lease: float  # the renewal interval it was told
    grace: float  # each renewal keeps it alive this long


class Leases:
    def __init__(self) -> None:
        self.pending: dict[str, Renewal] = {}
        self.last: dict[str, LastExchange] = {}
        self.uses: dict[str, float] = {}  # token id -> last use, not yet written
        self.pingers: dict[str, Pinger] = {}  # instance id -> what its renewals must match
        self.credentials: dict[str, str] = {}  # sha256 of an agent credential -> instance id

    def used(self, token_id: str, at: float) -> None:
        """A credential was used (recorded at most about once a minute per token)."""
        self.uses[token_id] = max(at, self.uses.get(token_id, at))

    def renew(self, renewal: Renewal) -> None:
        prev = self.pending.get(renewal.instance_id)
        if prev is None or prev.heard_at <= renewal.heard_at:
            self.pending[renewal.instance_id] = renewal

    def written(self, instance_id: str, at: float) -> None:
        """An exchange wrote the instance's lease as heard at `at`: a renewal pending
        from no later than that says nothing more (corral.server.api.agents.heard_alive)."""
        prev = self.pending.get(instance_id)
        if prev is not None and prev.heard_at <= at:
            del self.pending[instance_id]

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
        """A new incarnation registered (or its credential was revoked): what the old
        one reported says nothing, and its renewals need an exchange first."""
        self.last.pop(instance_id, None)
        self.pingers.pop(instance_id, None)

    def admit(self, instance_id: str, credential_hash: str | None, pinger: Pinger) -> None:
        """After a full exchange that told the agent to renew between exchanges."""
        self.pingers[instance_id] = pinger
        if credential_hash is not None:
            self.credentials[credential_hash] = instance_id


class Renewed(enum.Enum):
    """A renewal request's outcome (corral.server.lease_route answers 204 or 409)."""

    RENEWED = "renewed"
    NEWS = "news"  # renewed, and there is news for the instance: an exchange first
    REFUSED = "refused"  # not renewed: an exchange first


def renew_by_request(ctx: ServerContext, instance_id: str, incarnation: int) -> Renewed:
    """A renewal request from an agent whose credential maps to `instance_id`: renew
    its lease in the buffer, unless this server has not admitted it (unknown here,
    another incarnation, or its admission expired: REFUSED). Something that woke the
    instance since its last exchange does not stop the renewal (the request still
    proves the agent alive, and its exchange may be refused for load meanwhile), but
    asks for an exchange (NEWS)."""
    p = ctx.leases.pingers.get(instance_id)
    now = ctx.now()
    if p is None or p.incarnation != incarnation or now > p.until:
        return Renewed.REFUSED
    ctx.leases.renew(Renewal(instance_id, incarnation, now, now + p.grace, p.lease))
    if ctx.notifier.generation(instance_key(instance_id)) != p.generation:
        return Renewed.NEWS
    return Renewed.RENEWED


def renews_meanwhile(ctx: ServerContext, instance_id: str, incarnation: int, until: float) -> bool:
    """Whether this server accepts the agent's renewals until `until` (what keeps a
    refused agent alive while it waits out a Retry-After)."""
    p = ctx.leases.pingers.get(instance_id)
    return p is not None and p.incarnation == incarnation and p.until >= until


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
