"""Drainer: move draining instances' unique data to running ones (or to their fleet's
durable store, confirmed here), retire them when nothing is at risk, then have their
backend terminate them."""

from __future__ import annotations

import logging
import random

from corral.domain.instances import InstanceState
from corral.domain.provisioning import ProvisionError, ProvisionState, stop_retry_at
from corral.server import durable, metrics
from corral.server.context import ServerContext
from corral.server.leases import instance_key
from corral.store import drain, events, fleets, instances, offloads, provisions
from corral.store import objects as objs

log = logging.getLogger("corral.drainer")


async def drain_once(ctx: ServerContext) -> bool:
    cfg = ctx.config
    now = ctx.now()
    results: list[drain.DrainResult] = []

    async def step(conn):
        nonlocal now
        now = ctx.now()  # in the transaction: a retirement is stamped when it is decided
        results.clear()
        await drain.cancel_doomed_copies(conn, now, cfg.transfer_timeout)
        await offloads.expire(conn, now, cfg.transfer_timeout)
        targets = None  # the recipients, computed once for every step of this pass
        for inst in await drain.claim_draining(conn, ctx.db):
            if targets is None:
                targets = await drain.recipients(conn)
            results.append(
                await drain.drain_step(
                    conn, inst, now, drain_grace=cfg.drain_grace, targets=targets
                )
            )

    await ctx.db.transact(step)
    announce(ctx, results, now)
    # an instance whose drain began (by an operator, a fleet scale-in, the autoscaler):
    # its agent must look at once (its state; a heartbeat that reports nothing new
    # otherwise skips the exchange, corral.server.leases). After the recipients: their
    # exchanges (the orders) go first, the data moves sooner.
    draining = {r.instance_id for r in results}
    for instance_id in sorted(draining - ctx.drains_seen):
        ctx.notifier.wake(instance_key(instance_id))
    ctx.drains_seen = draining
    confirmed = await confirm_offloads(ctx)
    await terminate_retired(ctx, now)
    await clean_staging(ctx)
    return confirmed  # run again at once: the instance may retire now


def announce(ctx: ServerContext, results: list[drain.DrainResult], now: float) -> None:
    """After drain steps committed (the drain loop's, or those a copies report ran):
    wake the recipients of new copies first (their held heartbeats take the orders),
    then the instances told to exit or to upload, then the dispatcher for requeued
    attempts."""
    recipients = {recipient: None for r in results for _sha, recipient in r.copies}
    for recipient in recipients:
        ctx.notifier.wake(instance_key(recipient))
    for r in results:
        if r.retired and r.drain_requested_at is not None:
            metrics.DRAIN_DURATION.observe(max(0.0, now - r.drain_requested_at))
        if r.retired or r.offloads:  # its held heartbeat: exit, or upload these
            ctx.notifier.wake(instance_key(r.instance_id))
    if any(r.requeued for r in results):
        ctx.notifier.wake("dispatch")


async def confirm_offloads(ctx: ServerContext) -> bool:
    """Check in the bucket itself each upload an agent reported; only a copy seen
    there, with the right size and sha256, makes the object safe."""
    done = False
    for row in await ctx.db.transact(offloads.claim_uploaded, ctx.db):
        store = await ctx.db.query(fleets.durable_store, row.fleet)
        if store is None:
            why: str | None = f"fleet {row.fleet} no longer has a durable store"
        else:
            why = await durable.confirm(store, row.sha256, row.size, ctx.now())
        if why or store is None:
            await ctx.db.transact(
                offloads.rejected, row.sha256, row.instance_id, why or "no store", ctx.now()
            )
        else:
            await ctx.db.transact(
                offloads.confirmed, row.sha256, row.fleet, store.url_of(row.sha256), ctx.now()
            )
            metrics.OFFLOAD_CONFIRMED.inc(row.size or 0)
            done = True
    return done


async def terminate_retired(ctx: ServerContext, now: float) -> None:
    """Retired instances whose backend this server has are terminated after the
    retire grace (time for the agent to hear `exit` and write its tombstone). A
    failed termination is a WARNING and is retried with backoff; the instance stays
    retired (it holds nothing) meanwhile."""
    if not ctx.backends:
        return
    due = await ctx.db.query(drain.claim_terminable, ctx.db, now - ctx.config.retire_grace, now)
    for inst in due:
        fleet = await ctx.db.query(fleets.get_fleet, inst["fleet"]) if inst["fleet"] else None
        backend = ctx.backends.get(fleet["backend"]) if fleet else None
        if fleet is None or backend is None or not inst["backend_ref"]:
            continue
        try:
            await backend.terminate(
                inst["backend_ref"], name=inst["name"], spec=fleet["spec"] or {}
            )
        except Exception as exc:  # a backend failure is reported, and retried later
            if not isinstance(exc, ProvisionError):
                log.exception("terminating %s failed", inst["name"])

            async def failed(conn, inst=inst, exc=exc):
                t = ctx.now()
                n = 1 + (
                    inst["provision_attempts"]
                    if inst["provision_state"] == ProvisionState.STOP_FAILED
                    else 0
                )
                retry_at = stop_retry_at(n, t, ctx.provision_policy, random.random())
                await provisions.stop_failed(conn, inst["id"], str(exc), n, retry_at, t)
                await events.record(
                    conn,
                    t,
                    "warning",
                    "instance.terminate_failed",
                    f"terminating {inst['name']} failed ({n} in a row): {exc}; "
                    f"retrying in {retry_at - t:.0f}s",
                    instance_id=inst["id"],
                )

            await ctx.db.transact(failed)
            continue

        async def mark(conn, inst=inst):
            row = await instances.get_instance(conn, inst["id"])
            if row is not None and row["state"] == InstanceState.RETIRED:
                await instances.transition(conn, inst["id"], InstanceState.TERMINATED, ctx.now())
                await events.record(
                    conn,
                    ctx.now(),
                    "info",
                    "instance.terminated",
                    f"instance {inst['name']} ({inst['id']}) terminated",
                    instance_id=inst["id"],
                )

        await ctx.db.transact(mark)


async def clean_staging(ctx: ServerContext) -> None:
    """Uploads staged here are deleted once a running instance holds them."""
    from corral.server.api.objects import staging_dir

    for sha in await ctx.db.transact(objs.unstage_placed, ctx.server_id):
        (staging_dir(ctx) / sha).unlink(missing_ok=True)
