"""Reaper: instances that stopped heartbeating, attempts that never started or went
silent. Their attempts are revoked and the jobs requeued (or failed when out of
attempts). Nothing is reaped during the first grace period after this server starts,
so agents and runners that were cut off by a server restart have time to come back."""

from __future__ import annotations

from corral.domain.heartbeat import grace_period
from corral.server.context import ServerContext
from corral.store import dispatch, events, instances
from corral.store import jobs as jobs_repo


async def reap_once(ctx: ServerContext) -> bool:
    cfg = ctx.config
    now = ctx.now()
    # leases ran on while no server was up to renew them: give agents one grace
    told = ctx.heartbeat_interval[0] if ctx.heartbeat_interval else cfg.heartbeat_base
    if now - ctx.started_at < grace_period(told, cfg.agent_grace):
        return False
    changed: list[tuple[int, int, str | None]] = []
    lost_instances: list[str] = []

    async def lost(conn):
        for inst in await instances.find_lost(conn, ctx.db, now, now - cfg.agent_grace):
            if not await instances.mark_lost(conn, inst["id"], now):
                continue
            silent = now - inst["last_heartbeat_at"]
            told = inst["heartbeat_interval"]
            every = f" (told to heartbeat every {told:g}s)" if told else ""
            await events.record(
                conn,
                now,
                "warning",
                "instance.lost",
                f"instance {inst['name']} ({inst['id']}) lost: no heartbeat for "
                f"{silent:.0f}s{every}",
                instance_id=inst["id"],
            )
            lost_instances.append(inst["id"])
            changed.extend(
                await dispatch.lose_all_on(
                    conn, inst["id"], f"instance {inst['name']} stopped heartbeating", now
                )
            )

    async def unstarted(conn):
        for a in await dispatch.claim_unstarted(conn, ctx.db, now - cfg.start_timeout):
            state = await jobs_repo.lose_attempt(
                conn,
                a["job_id"],
                a["number"],
                f"did not start within {cfg.start_timeout:g}s on {a['instance_id']}",
                now,
                instance_id=a["instance_id"],
            )
            changed.append((a["job_id"], a["number"], state))

    async def silent(conn):
        for a in await dispatch.claim_silent(conn, ctx.db, now - cfg.attempt_grace):
            state = await jobs_repo.lose_attempt(
                conn,
                a["job_id"],
                a["number"],
                f"runner silent for over {cfg.attempt_grace:g}s on {a['instance_id']}",
                now,
                instance_id=a["instance_id"],
            )
            changed.append((a["job_id"], a["number"], state))

    for step in (lost, unstarted, silent):
        await ctx.db.transact(step)
    for job_id, _n, _state in changed:
        ctx.notifier.wake(("job", job_id))
    for instance_id in lost_instances:
        ctx.notifier.wake(("instance", instance_id))
    if changed:
        ctx.notifier.wake("dispatch")
    return False
