"""Fleet provisioning: keep each fleet this server can provision at its target size,
provision each new instance's machine (in the background, with bounded retries and
backoff), notice when its agent registers or never does, and bring back the machines
of live instances after a restart.

A fleet whose backend has a fixed pool of machines (an SSH fleet's hosts) puts each
new instance on a free one, chosen here in the same transaction that creates the
instance, so no two instances (and no two servers) ever pick the same host."""

from __future__ import annotations

import asyncio
import logging
import random

from corral.domain.instances import InstanceState
from corral.domain.provisioning import (
    FailureKind,
    ProvisionError,
    ProvisionState,
    Step,
    after_failure,
    free_slots,
    next_step,
)
from corral.server.context import ServerContext
from corral.store import events, fleets, instances, provisions, servers

log = logging.getLogger("corral.fleets")


def _where(ref: str | None) -> str:
    return f" on {ref.split(':', 1)[1]}" if ref and ref.startswith("ssh:") else ""


async def provision_once(ctx: ServerContext) -> bool:
    if not ctx.backends or ctx.stopping:
        return False
    now = ctx.now()
    starts: list[tuple[dict, dict]] = []  # (fleet, instance) to provision now
    live: list[tuple[dict, dict]] = []

    async def plan(conn):
        alive = {
            s["id"]
            for s in await servers.list_servers(conn, include_stopped_since=now)
            if s["stopped_at"] is None and now - s["last_seen_at"] <= ctx.config.server_grace
        }
        for fleet in await fleets.claim_fleets(conn, ctx.db, list(ctx.backends)):
            fleet = dict(fleet)
            await _grow(ctx, conn, fleet, now)
            for m in await fleets.fleet_instances(conn, fleet["name"], fleets.LIVE):
                m = dict(m)
                if m["state"] == InstanceState.PENDING:
                    if m["provision_server"] == ctx.server_id:
                        busy = m["id"] in ctx.provisioning
                    else:
                        busy = m["provision_server"] in alive
                    step = next_step(
                        m["provision_state"],
                        updated_at=m["provision_updated_at"],
                        next_at=m["provision_next_at"],
                        in_progress=busy,
                        now=now,
                        policy=ctx.provision_policy,
                    )
                    if step is Step.START and m["id"] not in ctx.provisioning:
                        m["provision_attempts"] = await provisions.begin(
                            conn, m["id"], ctx.server_id, now
                        )
                        starts.append((fleet, m))
                    elif step is Step.TIMED_OUT:
                        error = ProvisionError(
                            FailureKind.NOT_REGISTERED,
                            f"its agent was started but did not register within "
                            f"{ctx.provision_policy.register_timeout:g}s",
                        )
                        await _record_failure(conn, ctx, m, error, now)
                elif m["provision_state"] in (
                    ProvisionState.STARTED,
                    ProvisionState.CONNECTING,
                    ProvisionState.INSTALLING,
                ):
                    await provisions.ready(conn, m["id"], now)
                    await events.record(
                        conn,
                        now,
                        "info",
                        "instance.provisioned",
                        f"instance {m['name']} ({m['id']}){_where(m['backend_ref'])} is "
                        f"ready: its agent registered (try {m['provision_attempts']})",
                        instance_id=m["id"],
                    )
                live.append((fleet, m))

    await ctx.db.transact(plan)
    loop = asyncio.get_running_loop()
    for fleet, m in starts:
        ctx.provisioning[m["id"]] = loop.create_task(
            _provision(ctx, fleet, m), name=f"corral-provision-{m['name']}"
        )
    for fleet, m in live:
        await ctx.backends[fleet["backend"]].ensure(
            m["id"],
            m["name"],
            m["fleet"],
            m["backend_ref"],
            cpus=fleet["cpus"],
            memory_mb=fleet["memory_mb"],
            spec=fleet["spec"] or {},
        )
    return False


async def _grow(ctx: ServerContext, conn, fleet: dict, now: float) -> None:
    """Create the pending instances the fleet is missing (on free pool machines)."""
    members = await fleets.fleet_instances(conn, fleet["name"], fleets.LIVE)
    active = [m for m in members if m["state"] != InstanceState.DRAINING]
    missing = max(0, fleet["target_size"] - len(active))
    if not missing:
        return
    pool = ctx.backends[fleet["backend"]].slots(fleet["name"], fleet["spec"] or {})
    refs: list[str | None]
    if pool is None:
        refs = [None] * missing
    else:
        holding = await fleets.fleet_instances(conn, fleet["name"], fleets.HOLDING)
        refs = list(free_slots(pool, [m["backend_ref"] for m in holding], missing))
    names = await fleets.next_instance_names(conn, fleet["name"], len(refs))
    for name, ref in zip(names, refs, strict=True):
        instance_id = await instances.create_pending(
            conn, name=name, fleet=fleet["name"], now=now, backend_ref=ref
        )
        await events.record(
            conn,
            now,
            "info",
            "instance.created",
            f"fleet {fleet['name']}: creating instance {name} ({instance_id}){_where(ref)} "
            f"on backend {fleet['backend']} (target {fleet['target_size']})",
            instance_id=instance_id,
        )


async def _provision(ctx: ServerContext, fleet: dict, inst: dict) -> None:
    """One try at provisioning an instance's machine, in the background."""
    iid = inst["id"]
    backend = ctx.backends[fleet["backend"]]

    async def progress(step: str) -> None:
        await ctx.db.transact(provisions.step, iid, ProvisionState(step), ctx.server_id, ctx.now())

    failure: ProvisionError | None = None
    try:
        ref = await asyncio.wait_for(
            backend.create(
                iid,
                inst["name"],
                fleet["name"],
                cpus=fleet["cpus"],
                memory_mb=fleet["memory_mb"],
                ref=inst["backend_ref"],
                spec=fleet["spec"] or {},
                progress=progress,
            ),
            ctx.config.provision_timeout,
        )
    except ProvisionError as exc:
        failure = exc
    except TimeoutError:
        failure = ProvisionError(
            FailureKind.ERROR, f"took longer than {ctx.config.provision_timeout:g}s"
        )
    except asyncio.CancelledError:
        ctx.provisioning.pop(iid, None)
        raise
    except Exception as exc:  # a backend bug must not end the loop; it is reported
        log.exception("provisioning %s failed", inst["name"])
        failure = ProvisionError(FailureKind.ERROR, f"{exc.__class__.__name__}: {exc}")
    try:
        if failure is None:

            async def done(conn):
                state = await provisions.started(conn, iid, ref, ctx.now())
                await events.record(
                    conn,
                    ctx.now(),
                    "info",
                    "instance.agent_started",
                    f"instance {inst['name']} ({iid}){_where(ref)}: agent started"
                    + ("; waiting for it to register" if state == ProvisionState.STARTED else ""),
                    instance_id=iid,
                )

            await ctx.db.transact(done)
        else:
            await ctx.db.transact(_record_failure, ctx, inst, failure, ctx.now())
    finally:
        ctx.provisioning.pop(iid, None)
    ctx.notifier.wake("fleets")


async def _record_failure(
    conn, ctx: ServerContext, inst: dict, error: ProvisionError, now: float
) -> None:
    """A try failed: a WARNING event with the reason, then back off or give up."""
    attempts = inst["provision_attempts"] or 1
    then = after_failure(error, attempts, now, ctx.provision_policy, random.random())
    await provisions.failed(conn, inst["id"], then.state, str(error), then.next_at, now)
    where = _where(inst["backend_ref"])
    if error.kind is FailureKind.HOST_KEY_CHANGED:
        what = f"refusing to provision instance {inst['name']} ({inst['id']}){where}: "
    else:
        what = f"provisioning instance {inst['name']} ({inst['id']}){where} failed: "
    await events.record(
        conn,
        now,
        "warning",
        "instance.provision_failed" if then.next_at is not None else "instance.provision_gave_up",
        f"{what}{error.message} ({then.why})",
        instance_id=inst["id"],
        data={
            "reason": str(error.kind),
            "attempt": attempts,
            "retry_in": then.delay,
            "host": inst["backend_ref"],
        },
    )
