"""The agent protocol: register, then heartbeat (observed state up, desired state down)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable

from fastapi import APIRouter, Depends, Request

from corral.api import (
    HeartbeatReply,
    HeartbeatRequest,
    ObservedAttempt,
    OffloadOrder,
    RegisterReply,
    RegisterRequest,
    StartOrder,
)
from corral.domain.backoff import RETRY_AFTER_SPREAD
from corral.domain.heartbeat import (
    LastExchange,
    Look,
    Pacing,
    full_exchange_every,
    grace_period,
    look_needed,
    only_placements,
    renewal_interval,
    told_interval,
)
from corral.domain.instances import Admission, InstanceState
from corral.domain.presign import DurableStore
from corral.domain.tokens import hash_secret
from corral.server import metrics
from corral.server.auth import Principal, require_agent, require_joiner
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import SCOPE_RECEIVED, MiB, body_limit
from corral.server.leases import (
    Pinger,
    body_digest,
    current_pacing,
    deliveries_key,
    instance_key,
    renews_meanwhile,
)
from corral.server.loadgate import Overloaded
from corral.store import components, dispatch, fleets, instances, objects, offloads, tokens

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])


# The longest Retry-After a refused heartbeat is told when nothing but its exchanges
# keeps its agent alive (refused_alive).
HEARTBEAT_RETRY_MAX = 3


def _busy(exc: Overloaded) -> ApiError:
    metrics.AGENT_REFUSED.inc()
    return ApiError(
        503,
        "overloaded",
        f"{exc}: this server has more agent exchanges waiting than it can serve soon",
        headers={"Retry-After": str(exc.retry_after)},
    )


async def registration_not_overloaded(
    request: Request, ctx: ServerContext = Depends(get_ctx)
) -> None:
    """Before a registration's work: refuse at once when the registrations already
    waiting for the gate are too many (registrations go ahead of heartbeats there).
    (The body guard has checked the credential already: unauthenticated requests get
    401, not 503.)"""
    try:
        received = request.scope.get(SCOPE_RECEIVED)
        age = time.monotonic() - received if received is not None else 0.0
        ctx.gate().check(age, urgent=True)
    except Overloaded as exc:
        raise _busy(exc) from None


@contextlib.asynccontextmanager
async def admitted(ctx: ServerContext, *, urgent: bool = False) -> AsyncIterator[None]:
    """Through the agent gate, or 503 with Retry-After when it is full."""
    try:
        async with ctx.gate().enter(urgent=urgent):
            yield
    except Overloaded as exc:
        raise _busy(exc) from None


@router.post(
    "/register",
    response_model=RegisterReply,
    summary="Join, or rejoin after a restart",
    dependencies=[Depends(registration_not_overloaded)],
)
# not shed with the heartbeats (shed_under_load): registrations go ahead of them
async def register(
    body: RegisterRequest,
    who: Principal = Depends(require_joiner),
    ctx: ServerContext = Depends(get_ctx),
) -> RegisterReply:
    if who.kind == tokens.AGENT:
        if body.instance_id is None or body.instance_id != who.instance_id:
            raise ApiError(403, "forbidden", "this credential belongs to another instance")
        instance_id = body.instance_id
    else:
        if body.instance_id is not None:
            raise ApiError(
                422,
                "invalid_request",
                "instance_id: rejoining needs the instance's own credential, not a join token",
            )
        instance_id = None
    # what this reply tells the agent sets how long it may then stay silent: its
    # renewals' interval when it is told to renew between exchanges (from now on)
    pace = await current_pacing(ctx)
    interval = pace.interval
    grace = grace_period(renewal_interval(interval, pace.lease), ctx.config.agent_grace)
    try:
        async with admitted(ctx, urgent=True):
            reg = await ctx.db.transact(
                instances.register,
                name=body.name,
                instance_id=instance_id,
                cpus=body.cpus,
                memory_mb=body.memory_mb,
                host=body.host,
                agent_version=body.agent_version,
                fleet=body.fleet,
                peer_url=body.peer_url,
                now=ctx.now(),
                sandbox=body.sandbox,
                sandbox_warnings=body.sandbox_warnings,
                join_key=body.join_key,
                interval=interval,
                grace=grace,
            )
    except instances.NameInUse as exc:
        raise ApiError(409, "name_in_use", str(exc)) from None
    except instances.UnknownFleet as exc:
        raise ApiError(422, "unknown_fleet", str(exc)) from None
    if reg.decision.admission is Admission.EXIT or reg.instance is None:
        return RegisterReply(
            action="exit",
            reason=reg.decision.reason,
            interval=interval,
            instance_id=reg.instance["id"] if reg.instance else None,
        )
    # a new incarnation: what the old one reported no longer stands, on any server
    instance_id = reg.instance["id"]
    ctx.leases.forget(instance_id)
    # its renewals are accepted from now on, so a first exchange refused for load does
    # not leave it to three exchange intervals' grace (the generation before the wake:
    # its renewals ask for that first exchange)
    gen = ctx.notifier.generation(instance_key(instance_id))
    credential_hash = hash_secret(reg.credential) if reg.credential else who.credential_hash
    admit_renewals(
        ctx, instance_id, credential_hash, reg.instance["incarnation"], gen, ctx.now(), pace
    )
    ctx.notifier.wake("dispatch", instance_key(instance_id))
    return RegisterReply(
        action="welcome",
        reason=reg.decision.reason,
        instance_id=instance_id,
        incarnation=reg.instance["incarnation"],
        credential=reg.credential,
        interval=interval,
        lease_interval=pace.lease,
        state=reg.instance["state"],
    )


Gone = Callable[[], Awaitable[bool]]


async def client_gone(request: Request) -> Gone:
    """Has the agent holding this request hung up? (Asked before a held heartbeat runs
    its exchange again: orders go only to a connection still open.)"""
    return request.is_disconnected


async def never_gone() -> bool:
    """For callers without a connection (the simulator, benchmarks)."""
    return False


@router.post(
    "/heartbeat",
    response_model=HeartbeatReply,
    summary="Report observed state; get desired state (long-polls up to `wait`)",
)
@body_limit(16 * MiB)  # the sha256 of every object held, on a first heartbeat
# not shed before its credential is read (shed_under_load): a heartbeat that would
# change nothing is served while the gate is full, and one refused still proves its
# agent alive (refused_alive)
async def heartbeat(
    body: HeartbeatRequest,
    who: Principal = Depends(require_agent),
    ctx: ServerContext = Depends(get_ctx),
    gone: Gone = Depends(client_gone),
    # None: called without a connection (the simulator, benchmarks): nothing queued
    request: Request = None,  # type: ignore[assignment]
) -> HeartbeatReply:
    if body.instance_id != who.instance_id:
        raise ApiError(403, "forbidden", "this credential belongs to another instance")
    received = ctx.now()  # its object list was composed before this
    pace = await current_pacing(ctx)
    interval = pace.interval
    # how long it may stay silent: from how often it renews its lease, by its own
    # account (an agent that does not renew between exchanges: its exchanges)
    renews = renewal_interval(interval, body.renews_every)
    grace = grace_period(renews, ctx.config.agent_grace)
    loop = asyncio.get_running_loop()
    told = told_interval(interval, body.instance_id, received)  # this reply's interval
    deadline = loop.time() + min(body.wait, told)
    key = instance_key(body.instance_id)
    placed = deliveries_key(body.instance_id)
    digest = body_digest(body)
    first = True
    only_placed = False  # woken by placements alone: only deliveries can be new
    uploaded = False
    exchanged_at: float | None = None
    while True:
        gen = ctx.notifier.generation(key)
        placed_gen = ctx.notifier.generation(placed)
        look = Look.FULL
        if first:
            look, last_state = renew_unless_full(ctx, body, digest, gen, placed_gen, pace, grace)
        if look is not Look.FULL:
            admit_renewals(
                ctx, who.instance_id, who.credential_hash, body.incarnation, gen, ctx.now(), pace
            )
            first = False  # the lease is renewed (buffered)
        if look is Look.NONE:
            renewed = HeartbeatReply(
                action="continue", interval=told, lease_interval=pace.lease, state=last_state
            )
            remaining = deadline - loop.time()
            if remaining <= 0:
                return renewed
            woken = await ctx.notifier.wait(key, gen, held := ctx.recheck(remaining))
            if (not woken and held >= remaining) or await gone():
                return renewed
            only_placed = woken and woken_by_placements(ctx, key, gen, placed, placed_gen)
            continue
        only_placed = only_placed or look is Look.PLACEMENTS
        if first:
            # its arrival proves the agent alive, whether the exchange below runs
            # at once, waits for the gate, or is refused (buffered: no database)
            heard_alive(ctx, body, renews, grace)
            try:  # the full exchange needs the database: refused at once when full
                received_at = request.scope.get(SCOPE_RECEIVED) if request else None
                ctx.gate().check(time.monotonic() - received_at if received_at else 0.0)
            except Overloaded as exc:
                raise refused_alive(ctx, body, renews, grace, exc, pace) from None

        async def exchange(conn, first=first, only_placed=only_placed):
            nonlocal uploaded
            now = ctx.now()
            decision, row = await instances.heartbeat(
                conn,
                body.instance_id,
                body.incarnation,
                now,
                touch=first,
                interval=renews,
                grace=grace,
            )
            if decision.admission is Admission.EXIT or row is None:
                return HeartbeatReply(action="exit", reason=decision.reason, interval=told)
            nonlocal exchanged_at
            exchanged_at = now
            if only_placed:  # the rest was looked at before the wait, and not woken since
                return HeartbeatReply(
                    action="continue",
                    interval=told,
                    lease_interval=pace.lease,
                    state=row["state"],
                    start=await dispatch.deliver_attempts(
                        conn, body.instance_id, now, ctx.config.url
                    ),
                )
            kills = await dispatch.kills_for(conn, body.instance_id, body.attempts)
            starts = await dispatch.deliver_attempts(conn, body.instance_id, now, ctx.config.url)
            installs = await components.sync(conn, row, body.components, now, ctx.install_policy)
            replicate = await objects.sync(
                conn,
                row,
                body.objects if first else None,
                body.object_errors if first else [],
                now,
                ctx.config.url,
                listed_before=received,
            )
            if first:
                uploaded = await offloads.report(
                    conn, body.instance_id, body.offloaded, body.offload_errors, now
                )
            offload = await offload_orders(conn, body.instance_id, now)
            return HeartbeatReply(
                action="continue",
                interval=told,
                lease_interval=pace.lease,
                state=row["state"],
                start=starts,
                kill=kills,
                install=installs,
                replicate=replicate,
                offload=offload,
            )

        uploaded = False
        t0 = time.perf_counter()
        try:
            async with ctx.gate().enter(refuse=first):
                reply = await ctx.db.transact(exchange)
        except Overloaded as exc:
            raise refused_alive(ctx, body, renews, grace, exc, pace) from None
        metrics.observe_heartbeat(time.perf_counter() - t0, ctx.now())
        remember(ctx, body, reply, digest, gen, placed_gen, full=not only_placed)
        if exchanged_at is not None:
            if first:  # it wrote the lease: the one buffered on arrival is moot
                ctx.leases.written(body.instance_id, exchanged_at)
            admit_renewals(
                ctx, who.instance_id, who.credential_hash, body.incarnation, gen, exchanged_at, pace
            )
        elif reply.action == "exit":
            ctx.leases.forget(body.instance_id)  # no renewal keeps it now
            ctx.leases.pending.pop(body.instance_id, None)  # nor the one heard on arrival
        for order in reply.install:
            metrics.INSTALL_ORDERS.labels(order.component).inc()
        metrics.REPLICATION_ORDERS.inc(sum(f.size for f in reply.replicate))
        if uploaded:
            ctx.notifier.wake("drain")  # a server checks the bucket; then it may retire
        first = False
        remaining = deadline - loop.time()
        if (
            reply.action == "exit"
            or reply.start
            or reply.kill
            or reply.install
            or reply.replicate
            or reply.offload
            or remaining <= 0
        ):
            return reply
        woken = await ctx.notifier.wait(key, gen, held := ctx.recheck(remaining))
        if not woken and held >= remaining:
            # held to the end and nothing for this instance changed on any server (every
            # change wakes it: in process, or by LISTEN/NOTIFY): the last look stands
            return reply
        if await gone():
            # its agent is gone (killed while held): an order put in this reply would be
            # lost, and its attempt would wait out the start timeout
            return reply
        only_placed = woken and woken_by_placements(ctx, key, gen, placed, placed_gen)


def woken_by_placements(
    ctx: ServerContext, key: Hashable, gen: int, placed: Hashable, placed_gen: int
) -> bool:
    """Whether every wake-up of the instance since `gen` came with a placement on it
    by this server (its dispatcher wakes both keys at once; see
    corral.server.leases.deliveries_key): then the held exchange looks again only for
    the jobs placed, not at its components, objects, kills and offloads, which nothing
    woke. Any other wake-up (a cancel, a drain order, a new version, another server's
    placement, all waiters woken after the wake-up channel came back) moves only the
    instance's key and makes the look a full one."""
    n = ctx.notifier
    return only_placements(n.generation(key) - gen, n.generation(placed) - placed_gen)


def heard_alive(
    ctx: ServerContext, body: HeartbeatRequest, renews: float, grace: float, extra: float = 0.0
) -> None:
    """A heartbeat that arrived proves its agent alive before its exchange runs: its
    lease is renewed in the buffer (corral.server.leases, no database), so one kept
    waiting for the gate behind a registration storm, or refused, is not declared lost
    meanwhile (a freshly registered agent has no renewals admitted yet to keep it
    alive). The renewal names the incarnation the agent reports: a stale one renews
    nothing, and a lost instance comes back only through its exchange."""
    now = ctx.now()
    ctx.leases.renew(
        instances.Renewal(body.instance_id, body.incarnation, now, now + extra + grace, renews)
    )


def refused_alive(
    ctx: ServerContext,
    body: HeartbeatRequest,
    renews: float,
    grace: float,
    exc: Overloaded,
    pace: Pacing,
) -> ApiError:
    """A heartbeat refused for load (503) still proves its agent alive. An agent this
    server accepts renewals from (admitted, corral.server.leases.renews_meanwhile) stays
    alive by them while it waits out the Retry-After, so its lease is renewed for its
    grace only: if it dies meanwhile it is found as soon as any other. One that has only
    its exchanges (an older agent, or one registered while the fleet was small) is told
    at most HEARTBEAT_RETRY_MAX, and its lease is made to outlast that (the agent may
    wait up to RETRY_AFTER_SPREAD more) but no more than the fleet's renewal grace,
    however long its exchange interval: waiting as told never gets it declared lost,
    and a dead one is found within about 15 s (three exchange intervals' grace, 121 s
    at 2,000 agents, hid one in a benchmark)."""
    now = ctx.now()
    if body.renews_every is not None and renews_meanwhile(
        ctx, body.instance_id, body.incarnation, now + exc.retry_after
    ):
        heard_alive(ctx, body, renews, grace)
        return _busy(exc)
    retry = min(exc.retry_after, HEARTBEAT_RETRY_MAX)
    back_by = retry * (1 + RETRY_AFTER_SPREAD) + HEARTBEAT_RETRY_MAX  # with room to arrive
    fleet = grace_period(renewal_interval(pace.interval, pace.lease), ctx.config.agent_grace)
    heard_alive(ctx, body, renews, min(grace, max(fleet, back_by)))
    return _busy(Overloaded(retry))


def ordered_nothing(reply: HeartbeatReply) -> bool:
    """The reply gives the agent nothing to do (a held long-poll may go on waiting)."""
    return reply.action == "continue" and not (
        reply.start or reply.kill or reply.install or reply.replicate or reply.offload
    )


def remember(
    ctx: ServerContext,
    body: HeartbeatRequest,
    reply: HeartbeatReply,
    digest: bytes,
    gen: int,
    placed_gen: int,
    full: bool,
) -> None:
    """After an exchange: one that ordered nothing lets the same report, heard again
    soon with nothing woken meanwhile, skip the exchange. One that ordered only starts
    lets the report that adds exactly those attempts skip it: the agent's next report
    right after taking them (a start's token is issued once, so nothing is delivered
    again; the starts' own wake-ups came before `gen`). Any other does not (its orders
    are delivered again until the agent's report shows it acted on them). `full`: the
    exchange looked at everything; a look for placements only (woken_by_placements)
    keeps the time of the last full one, so a busy instance still gets a full look
    every `heartbeat_full_every` however many jobs it is handed meanwhile."""
    last = ctx.leases.last.get(body.instance_id)
    at = ctx.now() if full else (last.at if last is not None else None)
    only_starts = reply.start and not (
        reply.kill or reply.install or reply.replicate or reply.offload
    )
    if at is None or reply.state is None or reply.action != "continue":
        ctx.leases.last.pop(body.instance_id, None)
    elif ordered_nothing(reply):
        ctx.leases.last[body.instance_id] = LastExchange(digest, gen, placed_gen, at, reply.state)
    elif only_starts:
        expected = taken_digest(body, reply.start)
        ctx.leases.last[body.instance_id] = LastExchange(expected, gen, placed_gen, at, reply.state)
    else:
        ctx.leases.last.pop(body.instance_id, None)


def taken_digest(body: HeartbeatRequest, starts: list[StartOrder]) -> bytes:
    """The digest of the report `body` becomes once its agent has taken `starts`: the
    same, with those attempts among its own (which it lists by job and attempt)."""
    taken = [ObservedAttempt(job_id=o.job_id, attempt=o.attempt, token=o.token) for o in starts]
    attempts = sorted([*body.attempts, *taken], key=lambda a: (a.job_id, a.attempt))
    return body_digest(body.model_copy(update={"attempts": attempts}))


ADMISSION_MIN = 300.0


def admission_period(interval: float) -> float:
    """How long after an agent's last exchange on this server its renewals are still
    accepted: a few exchange intervals, and never less than five minutes, so an agent
    whose exchanges an overloaded server refuses (503) stays alive by its renewals.
    (A credential revoked on another server stops renewing here within this.)"""
    return max(3 * interval, ADMISSION_MIN)


def admit_renewals(
    ctx: ServerContext,
    instance_id: str | None,
    credential_hash: str | None,
    incarnation: int,
    gen: int,
    at: float,
    pace: Pacing,
) -> None:
    """After a registration or a full exchange that told the agent to renew its lease
    between exchanges: this server accepts its renewals (corral.server.lease_route)
    for the admission period (one woken since `gen` is asked for an exchange)."""
    if pace.lease is None or instance_id is None:
        return
    pinger = Pinger(
        incarnation=incarnation,
        generation=gen,
        until=at + admission_period(pace.interval),
        lease=pace.lease,
        grace=grace_period(pace.lease, ctx.config.agent_grace),
    )
    ctx.leases.admit(instance_id, credential_hash, pinger)


def renew_unless_full(
    ctx: ServerContext,
    body: HeartbeatRequest,
    digest: bytes,
    gen: int,
    placed_gen: int,
    pace: Pacing,
    grace: float,
) -> tuple[Look, InstanceState | None]:
    """What a heartbeat's exchange must look at (corral.domain.heartbeat.look_needed),
    and the state its last exchange replied. Unless it is the full look, its lease
    renewal is buffered (corral.server.leases) and the exchange writes none."""
    now = ctx.now()
    last = ctx.leases.last.get(body.instance_id)
    wakes_trusted = not ctx.db.is_postgres or ctx.notifier.cross_server
    full_every = full_exchange_every(pace.interval, ctx.config.heartbeat_full_every)
    look = look_needed(
        last,
        digest,
        gen,
        placed_gen,
        now,
        full_every,
        wakes_trusted,
        lists_objects=body.objects is not None,
    )
    if look is Look.FULL or last is None:
        return Look.FULL, None
    ctx.leases.renew(
        instances.Renewal(
            body.instance_id,
            body.incarnation,
            now,
            now + grace,
            renewal_interval(pace.interval, body.renews_every),
        )
    )
    metrics.HEARTBEATS_BATCHED.inc()
    return look, last.state


OFFLOAD_URL_TTL = 3600


async def offload_orders(conn, instance_id: str, now: float) -> list[OffloadOrder]:
    """Uploads ordered on this instance, each with a URL signed for that one object."""
    out = []
    stores: dict[str, DurableStore | None] = {}
    for row in await offloads.deliver(conn, instance_id, now):
        if row.fleet not in stores:
            stores[row.fleet] = await fleets.durable_store(conn, row.fleet)
        store = stores[row.fleet]
        if store is None:
            continue  # the fleet lost its store: the order expires and is planned afresh
        url, headers = store.put_order(row.sha256, now, OFFLOAD_URL_TTL)
        out.append(OffloadOrder(sha256=row.sha256, size=row.size, url=url, headers=headers))
    return out
