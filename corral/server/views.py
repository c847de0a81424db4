"""Database rows to API models."""

from __future__ import annotations

from corral.api import (
    AttemptView,
    EventView,
    FleetView,
    InstanceView,
    JobView,
    RolloutView,
    ServerView,
)
from corral.domain.sandbox import DEFAULT_LOG_LIMIT
from corral.store import components, fleets


def job_view(row, attempts=()) -> JobView:
    result = next((a for a in attempts if a["number"] == row["result_attempt"]), None)
    return JobView(
        id=row["id"],
        name=row["name"],
        state=row["state"],
        command=row["command"],
        fleet=row["fleet"],
        cpus=row["cpus"],
        memory_mb=row["memory_mb"],
        max_attempts=row["max_attempts"],
        attempt=row["current_attempt"],
        instance_id=row["instance_id"],
        exit_code=row["exit_code"],
        reason=row["reason"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        result_attempt=row["result_attempt"],
        attempts=[attempt_view(a) for a in attempts],
        workdir=row["workdir"],
        log_limit=row["log_limit"] or DEFAULT_LOG_LIMIT,
        secret_env=sorted(row.get("secret_env") or {}),
        notes=(result["notes"] or []) if result is not None else [],
    )


def attempt_view(a) -> AttemptView:
    return AttemptView(
        number=a["number"],
        instance_id=a["instance_id"],
        state=a["state"],
        exit_code=a["exit_code"],
        reason=a["reason"],
        created_at=a["created_at"],
        started_at=a["started_at"],
        finished_at=a["finished_at"],
        cpu_seconds=a["cpu_seconds"],
        peak_memory_mb=a["peak_memory_mb"],
        limits_enforced=a["limits_enforced"],
        notes=a["notes"] or [],
    )


def instance_view(row) -> InstanceView:
    return InstanceView(
        id=row["id"],
        name=row["name"],
        fleet=row["fleet"],
        state=row["state"],
        lost=row["lost_at"] is not None,
        incarnation=row["incarnation"],
        cpus=row["cpus"],
        memory_mb=row["memory_mb"],
        running_attempts=row.get("running_attempts", 0) or 0,
        host=row["host"],
        agent_version=row["agent_version"],
        registered_at=row["registered_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        drain_requested_at=row["drain_requested_at"],
        retired_at=row["retired_at"],
        message=row["message"],
        backend_ref=row["backend_ref"],
        provision_state=row["provision_state"],
        provision_error=row["provision_error"],
        provision_attempts=row["provision_attempts"] or 0,
        provision_next_at=row["provision_next_at"],
        sandbox=row["sandbox"],
    )


def event_view(row) -> EventView:
    return EventView(
        id=row["id"],
        ts=row["ts"],
        level=row["level"],
        kind=row["kind"],
        message=row["message"],
        job_id=row["job_id"],
        instance_id=row["instance_id"],
        server_id=row["server_id"],
    )


def server_view(row, now: float, grace: float) -> ServerView:
    return ServerView(
        id=row["id"],
        build_version=row["build_version"],
        host=row["host"],
        pid=row["pid"],
        url=row["url"],
        started_at=row["started_at"],
        last_seen_at=row["last_seen_at"],
        alive=row["stopped_at"] is None and now - row["last_seen_at"] <= grace,
    )


def fleet_view(f, counts: dict[str, int]) -> FleetView:
    return FleetView(
        name=f["name"],
        backend=f["backend"],
        min_size=f["min_size"],
        max_size=f["max_size"],
        target_size=f["target_size"],
        idle_timeout=f["idle_timeout"],
        cpus=f["cpus"],
        memory_mb=f["memory_mb"],
        durable=bool((f["spec"] or {}).get("durable")),
        pending=counts.get("pending", 0),
        running=counts.get("running", 0),
        draining=counts.get("draining", 0),
        hosts=[
            f"{h['user']}@{h['host']}:{h['port']}"
            for h in ((f["spec"] or {}).get("ssh") or {}).get("hosts", [])
        ],
    )


async def fleet_views(conn) -> list[FleetView]:
    out = []
    for f in await fleets.list_fleets(conn):
        counts: dict[str, int] = {}
        for m in await fleets.fleet_instances(conn, f["name"], fleets.LIVE):
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        out.append(fleet_view(f, counts))
    return out


async def rollout_view(conn, r) -> RolloutView:
    return RolloutView(
        id=r["id"],
        component=r["component"],
        version=r["version"],
        fleet=r["fleet"],
        previous_version=r["previous_version"],
        state=r["state"],
        max_unavailable=r["max_unavailable"],
        failure_threshold=r["failure_threshold"],
        allow_downgrade=r["allow_downgrade"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        message=r["message"],
        progress=await components.rollout_progress(conn, r),
    )
