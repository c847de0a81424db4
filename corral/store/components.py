"""Components, rollouts and the per-instance reconcile state.

The desired version of a component for a fleet is a row in desired_components, set
only by a rollout. Servers never derive it from their own build, so servers of
different builds on one database cannot disagree about it.
"""

from __future__ import annotations

import random
from collections import defaultdict

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.api import (
    ComponentPublish,
    InstallOrder,
    ObservedComponent,
    RolloutProgress,
    RolloutRequest,
)
from corral.domain.errors import IncomparableVersions
from corral.domain.instances import InstanceState
from corral.domain.reconcile import (
    Action,
    ComponentState,
    ComponentStatus,
    InstallPolicy,
    RolloutState,
    reconcile,
)
from corral.domain.versions import compare, parse_version
from corral.store import events
from corral.store.db import Database
from corral.store.schema import (
    components,
    desired_components,
    instance_components,
    instances,
    rollouts,
)

ALL_FLEETS = "*"
ACTIVE, PAUSED, COMPLETED = RolloutState.ACTIVE, RolloutState.PAUSED, RolloutState.COMPLETED
SUPERSEDED, ROLLED_BACK = RolloutState.SUPERSEDED, RolloutState.ROLLED_BACK
IN_FLIGHT = (ComponentState.PENDING, ComponentState.INSTALLING)


class ComponentError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---- catalogue ----------------------------------------------------------------------------


async def get_component(conn: AsyncConnection, name: str, version: str):
    q = sa.select(components).where(components.c.name == name, components.c.version == version)
    return (await conn.execute(q)).mappings().first()


async def publish(conn: AsyncConnection, spec: ComponentPublish, now: float):
    """Record an artifact. Versions are immutable: republishing the same version with
    other bytes is refused, so a version can never flap between two artifacts."""
    existing = await get_component(conn, spec.name, spec.version)
    if existing is not None:
        if existing["sha256"] == spec.sha256 and existing["url"] == spec.url:
            return existing
        raise ComponentError(
            409,
            f"{spec.name} {spec.version} is already published with sha256 "
            f"{existing['sha256'][:12]}… at {existing['url']}; versions are immutable, "
            f"publish a new version",
        )
    await conn.execute(
        sa.insert(components).values(
            name=spec.name,
            version=spec.version,
            scheme=parse_version(spec.version).scheme,
            url=spec.url,
            sha256=spec.sha256,
            size=spec.size,
            created_at=now,
        )
    )
    await events.record(
        conn,
        now,
        "info",
        "component.published",
        f"{spec.name} {spec.version} published (sha256 {spec.sha256[:12]}…)",
    )
    return await get_component(conn, spec.name, spec.version)


async def list_components(conn: AsyncConnection):
    q = sa.select(components).order_by(components.c.name, components.c.created_at)
    return (await conn.execute(q)).mappings().all()


# ---- rollouts -----------------------------------------------------------------------------


async def get_rollout(conn: AsyncConnection, rollout_id: int):
    q = sa.select(rollouts).where(rollouts.c.id == rollout_id)
    return (await conn.execute(q)).mappings().first()


async def current_desired(conn: AsyncConnection, fleet: str, component: str):
    q = sa.select(desired_components).where(
        desired_components.c.fleet == fleet, desired_components.c.component == component
    )
    return (await conn.execute(q)).mappings().first()


async def start_rollout(conn: AsyncConnection, req: RolloutRequest, now: float):
    fleet = req.fleet or ALL_FLEETS
    artifact = await get_component(conn, req.component, req.version)
    if artifact is None:
        raise ComponentError(
            404,
            f"{req.component} {req.version} is not published; publish it first "
            f"(corral components publish {req.component} {req.version} --url ... --sha256 ...)",
        )
    desired = await current_desired(conn, fleet, req.component)
    previous = desired["version"] if desired else None
    where = "every fleet" if fleet == ALL_FLEETS else f"fleet {fleet}"
    if previous == req.version and not req.force:
        # --force with the same version is what a held instance's warning suggests: a
        # new rollout that may replace what is installed (see _classify)
        raise ComponentError(
            409,
            f"{req.component} {req.version} is already desired for {where} "
            f"(--force orders it again where it is held or gave up)",
        )
    if previous is not None and previous != req.version:
        try:
            if compare(previous, req.version) > 0 and not (req.downgrade or req.force):
                raise ComponentError(
                    409,
                    f"{req.version} is lower than the desired {previous} for {where}; "
                    f"pass --downgrade to roll back",
                )
        except IncomparableVersions as exc:
            if not req.force:
                raise ComponentError(409, f"{exc}; pass --force to switch anyway") from None
    await conn.execute(
        sa.update(rollouts)
        .where(
            rollouts.c.component == req.component,
            rollouts.c.fleet == fleet,
            rollouts.c.state.in_([ACTIVE, PAUSED]),
        )
        .values(state=SUPERSEDED, updated_at=now)
    )
    rollout_id = (
        await conn.execute(
            sa.insert(rollouts)
            .values(
                component=req.component,
                version=req.version,
                fleet=fleet,
                previous_version=previous,
                state=ACTIVE,
                max_unavailable=req.max_unavailable,
                failure_threshold=req.failure_threshold,
                allow_downgrade=req.downgrade or req.force,
                created_at=now,
                updated_at=now,
            )
            .returning(rollouts.c.id)
        )
    ).scalar_one()
    if desired:
        await conn.execute(
            sa.update(desired_components)
            .where(
                desired_components.c.fleet == fleet, desired_components.c.component == req.component
            )
            .values(version=req.version, rollout_id=rollout_id, updated_at=now)
        )
    else:
        await conn.execute(
            sa.insert(desired_components).values(
                fleet=fleet,
                component=req.component,
                version=req.version,
                rollout_id=rollout_id,
                updated_at=now,
            )
        )
    await events.record(
        conn,
        now,
        "info",
        "rollout.started",
        f"rollout {rollout_id}: {req.component} {previous or '(none)'} -> {req.version} on "
        f"{where}, {req.max_unavailable} at a time, pause after "
        f"{req.failure_threshold + 1} failure(s)",
    )
    return await get_rollout(conn, rollout_id)


async def rollback(conn: AsyncConnection, component: str, fleet: str | None, now: float):
    key = fleet or ALL_FLEETS
    desired = await current_desired(conn, key, component)
    if desired is None:
        raise ComponentError(
            404,
            f"no rollout of {component} for "
            f"{'every fleet' if key == ALL_FLEETS else 'fleet ' + key}",
        )
    current = await get_rollout(conn, desired["rollout_id"])
    if not current["previous_version"]:
        raise ComponentError(409, f"rollout {current['id']} has no earlier version to return to")
    new = await start_rollout(
        conn,
        RolloutRequest(
            component=component,
            version=current["previous_version"],
            fleet=fleet,
            max_unavailable=current["max_unavailable"],
            failure_threshold=current["failure_threshold"],
            downgrade=True,
            force=True,
        ),
        now,
    )
    await conn.execute(
        sa.update(rollouts)
        .where(rollouts.c.id == current["id"])
        .values(state=ROLLED_BACK, updated_at=now)
    )
    return new


async def resume(conn: AsyncConnection, rollout_id: int, now: float):
    """Resume a paused rollout; its failed instances get a fresh set of orders."""
    r = await get_rollout(conn, rollout_id)
    if r is None:
        raise ComponentError(404, f"rollout {rollout_id} not found")
    if r["state"] != PAUSED:
        raise ComponentError(409, f"rollout {rollout_id} is {r['state']}, not paused")
    resumed = await conn.execute(
        sa.update(rollouts)
        .where(rollouts.c.id == rollout_id, rollouts.c.state == PAUSED)  # as read
        .values(state=ACTIVE, message=None, updated_at=now)
    )
    if resumed.rowcount != 1:
        raise ComponentError(409, f"rollout {rollout_id} changed meanwhile; look again")
    await conn.execute(
        sa.update(instance_components)
        .where(
            instance_components.c.rollout_id == rollout_id,
            instance_components.c.state == ComponentState.INSTALL_FAILED,
        )
        .values(state=ComponentState.PENDING, attempts=0, next_attempt_at=0, updated_at=now)
    )
    await events.record(conn, now, "info", "rollout.resumed", f"rollout {rollout_id} resumed")
    return await get_rollout(conn, rollout_id)


async def list_rollouts(conn: AsyncConnection, limit: int = 50):
    q = sa.select(rollouts).order_by(rollouts.c.id.desc()).limit(limit)
    return (await conn.execute(q)).mappings().all()


# ---- who should run what --------------------------------------------------------------------


def _classify(ic, sha: str, rollout) -> str:
    if ic is not None and ic["observed_sha256"] == sha:
        return "converged"
    if ic is None or ic["target_sha256"] != sha:
        return "waiting"
    if ic["rollout_id"] != rollout["id"] and ic["state"] in (
        ComponentState.HELD,
        ComponentState.INSTALL_FAILED,
    ):
        # held or given up under an earlier rollout of this version: a new rollout
        # (e.g. --force, which may replace what is installed) targets it afresh
        return "waiting"
    return {ComponentState.INSTALL_FAILED: "failed", ComponentState.HELD: "held"}.get(
        ic["state"], "in_flight"
    )


async def _scope(conn: AsyncConnection):
    """Running instances (`lost` ones too: one that went silent while installing is
    still unavailable) and, per component, which desired row applies to each."""
    insts = (
        (
            await conn.execute(
                sa.select(
                    instances.c.id,
                    instances.c.name,
                    instances.c.fleet,
                    instances.c.lost_at.is_not(None).label("lost"),
                )
                .where(instances.c.state == InstanceState.RUNNING)
                .order_by(instances.c.name)
            )
        )
        .mappings()
        .all()
    )
    desired = (await conn.execute(sa.select(desired_components))).mappings().all()
    by_key = {(d["fleet"], d["component"]): d for d in desired}
    per_rollout: dict[int, list] = defaultdict(list)
    for comp in {d["component"] for d in desired}:
        for inst in insts:
            d = by_key.get((inst["fleet"], comp)) or by_key.get((ALL_FLEETS, comp))
            if d is not None:
                per_rollout[d["rollout_id"]].append(inst)
    return per_rollout


async def _instance_components(conn: AsyncConnection, component: str, ids: list[str]):
    if not ids:
        return {}
    q = sa.select(instance_components).where(
        instance_components.c.component == component, instance_components.c.instance_id.in_(ids)
    )
    return {r["instance_id"]: r for r in (await conn.execute(q)).mappings().all()}


async def rollout_progress(conn: AsyncConnection, rollout) -> RolloutProgress:
    scope = (await _scope(conn)).get(rollout["id"], [])
    artifact = await get_component(conn, rollout["component"], rollout["version"])
    ics = await _instance_components(conn, rollout["component"], [i["id"] for i in scope])
    p = RolloutProgress(total=len(scope))
    for inst in scope:
        kind = _classify(ics.get(inst["id"]), artifact["sha256"], rollout)
        setattr(p, kind, getattr(p, kind) + 1)
    return p


async def _target(conn: AsyncConnection, inst, ic, rollout, artifact, now: float) -> None:
    values = dict(
        target_version=rollout["version"],
        target_sha256=artifact["sha256"],
        rollout_id=rollout["id"],
        allow_downgrade=rollout["allow_downgrade"],
        state=(
            ComponentState.CONVERGED
            if ic is not None and ic["observed_sha256"] == artifact["sha256"]
            else ComponentState.PENDING
        ),
        attempts=0,
        next_attempt_at=0,
        last_error=None,
        updated_at=now,
    )
    if ic is None:
        await conn.execute(
            sa.insert(instance_components).values(
                instance_id=inst["id"], component=rollout["component"], **values
            )
        )
    else:
        c = instance_components.c
        # only if the row is still what the rollout's pass read (compare-and-set); if a
        # heartbeat changed it meanwhile, the next pass decides again
        await conn.execute(
            sa.update(instance_components)
            .where(
                c.instance_id == inst["id"],
                c.component == rollout["component"],
                c.state == ic["state"],
                c.attempts == ic["attempts"],
                c.rollout_id.is_(None)
                if ic["rollout_id"] is None
                else c.rollout_id == ic["rollout_id"],
            )
            .values(**values)
        )


async def advance(conn: AsyncConnection, db: Database, now: float) -> list[str]:
    """Move every rollout along: target instances batch by batch (at most
    max_unavailable installing at once), pause on failures, complete when all
    converged. Instances that join later get the desired version straight away.
    Returns the instances that got a new target (their agents should hear soon)."""
    per_rollout = await _scope(conn)
    if not per_rollout:
        return []
    claimed = (
        (
            await conn.execute(
                db.claim(
                    sa.select(rollouts)
                    .where(rollouts.c.id.in_(list(per_rollout)))
                    .order_by(rollouts.c.id)
                )
            )
        )
        .mappings()
        .all()
    )
    touched = []
    for r in claimed:
        scope = per_rollout[r["id"]]
        artifact = await get_component(conn, r["component"], r["version"])
        ics = await _instance_components(conn, r["component"], [i["id"] for i in scope])
        kinds: dict[str, list] = defaultdict(list)
        for inst in scope:
            kinds[_classify(ics.get(inst["id"]), artifact["sha256"], r)].append(inst)
        if r["state"] == ACTIVE and len(kinds["failed"]) > r["failure_threshold"]:
            names = ", ".join(i["name"] for i in kinds["failed"])
            msg = (
                f"paused: {len(kinds['failed'])} instance(s) failed to install "
                f"{r['component']} {r['version']} ({names})"
            )
            await conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.id == r["id"])
                .values(state=PAUSED, message=msg, updated_at=now)
            )
            await events.record(
                conn,
                now,
                "warning",
                "rollout.paused",
                f"rollout {r['id']} {msg}; fix the cause, then "
                f"`corral rollout {r['component']} --resume {r['id']}` "
                f"or `--rollback`",
            )
            continue
        reachable = [i for i in kinds["waiting"] if not i["lost"]]
        if r["state"] == ACTIVE:
            # an installing instance that went silent still counts as unavailable
            slots = r["max_unavailable"] - len(kinds["in_flight"])
            batch = reachable[: max(0, slots)]
        elif r["state"] == COMPLETED:
            batch = reachable
        else:
            batch = []
        for inst in batch:
            await _target(conn, inst, ics.get(inst["id"]), r, artifact, now)
            touched.append(inst["id"])
        live = [i for i in scope if not i["lost"]]
        done = live and all(i in kinds["converged"] for i in live)
        if r["state"] == ACTIVE and done:
            await conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.id == r["id"])
                .values(state=COMPLETED, message=None, updated_at=now)
            )
            await events.record(
                conn,
                now,
                "info",
                "rollout.completed",
                f"rollout {r['id']}: {r['component']} {r['version']} "
                f"installed on all {len(live)} instance(s)",
            )
    return touched


# ---- the heartbeat's share: observed in, install orders out ---------------------------------


_COMPONENTS_OF = sa.select(instance_components).where(
    instance_components.c.instance_id == sa.bindparam("c_instance_id")
)


async def sync(
    conn: AsyncConnection,
    instance,
    observed: list[ObservedComponent],
    now: float,
    policy: InstallPolicy,
    rng: random.Random | None = None,
) -> list[InstallOrder]:
    """Record what the agent has installed and decide, per component, whether it is
    told to install its target now (counted, backed off, capped)."""
    rng = rng or random.Random()
    rows = {
        r["component"]: r
        for r in (await conn.execute(_COMPONENTS_OF, {"c_instance_id": instance["id"]}))
        .mappings()
        .all()
    }
    seen = {o.name: o for o in observed}
    for name in seen.keys() - rows.keys():
        new = seen[name]
        await conn.execute(
            sa.insert(instance_components).values(
                instance_id=instance["id"],
                component=name,
                observed_version=new.version,
                observed_sha256=new.sha256,
                state=ComponentState.UNMANAGED,
                updated_at=now,
            )
        )
    orders = []
    for name, row in rows.items():
        for _ in range(CAS_RETRIES):
            done, order = await _sync_one(
                conn, instance, name, row, seen.get(name), now, policy, rng
            )
            if done:
                break
            # another session changed the row since it was read (a resume, a new
            # target): decide again from what is there now
            fresh = (
                (
                    await conn.execute(
                        sa.select(instance_components).where(
                            instance_components.c.instance_id == instance["id"],
                            instance_components.c.component == name,
                        )
                    )
                )
                .mappings()
                .first()
            )
            if fresh is None:
                break
            row = fresh
        else:
            raise ComponentConflict(
                f"component {name} of instance {instance['id']} kept changing under the heartbeat"
            )
        if order is not None:
            orders.append(order)
    return orders


CAS_RETRIES = 5


class ComponentConflict(RuntimeError):
    """A row changed under us CAS_RETRIES times in a row (the heartbeat is retried)."""


async def _sync_one(
    conn: AsyncConnection,
    instance,
    name: str,
    row,
    o: ObservedComponent | None,
    now: float,
    policy: InstallPolicy,
    rng: random.Random,
) -> tuple[bool, InstallOrder | None]:
    """Decide for one component from `row` as read and write the decision back only
    if the row is still what was read (compare-and-set, like the fencing tokens).
    Returns (written, the install order if any); nothing is recorded unless written."""
    observed_version = o.version if o else None
    observed_sha256 = o.sha256 if o else None
    values: dict[str, object] = {
        "observed_version": observed_version,
        "observed_sha256": observed_sha256,
        "updated_at": now,
    }
    if o and o.error and o.error_sha256 == row["target_sha256"]:
        values["last_error"] = o.error
    status = ComponentStatus(
        observed_version=observed_version,
        observed_sha256=observed_sha256,
        target_version=row["target_version"],
        target_sha256=row["target_sha256"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        state=ComponentState(row["state"]),
        allow_downgrade=row["allow_downgrade"],
    )
    d = reconcile(status, now, policy, rng.random())
    where = f"instance {instance['name']} ({instance['id']})"
    order = None
    event: tuple[str, str, str] | None = None
    if d.action is Action.CONVERGED and row["state"] != ComponentState.CONVERGED:
        event = (
            "info",
            "component.converged",
            f"{where}: {name} {row['target_version']} installed",
        )
    elif d.action is Action.INSTALL:
        values["orders_total"] = row["orders_total"] + 1
        artifact = await get_component(conn, name, row["target_version"])
        order = InstallOrder(
            component=name,
            version=row["target_version"],
            url=artifact["url"],
            sha256=artifact["sha256"],
            size=artifact["size"],
            order=d.attempts,
        )
        event = ("info", "component.install", f"{where}: {d.reason}")
    elif d.action is Action.GIVE_UP and row["state"] != ComponentState.INSTALL_FAILED:
        err = values.get("last_error") or row["last_error"] or "no error reported"
        event = (
            "warning",
            "component.install_failed",
            f"{where}: {name} {row['target_version']} not installed after {d.attempts} "
            f"orders; giving up until a new rollout or resume. Last error: {err}",
        )
    elif d.action is Action.HOLD and row["state"] != ComponentState.HELD:
        event = ("warning", "component.held", f"{where}: {name}: {d.reason}")
    if d.state is not None:
        values.update(state=d.state, attempts=d.attempts, next_attempt_at=d.next_attempt_at)
    if order is None and event is None and _unchanged(row, values):
        return True, None  # the same report and the same decision: nothing to write
    c = instance_components.c
    result = await conn.execute(
        sa.update(instance_components)
        .where(
            c.instance_id == instance["id"],
            c.component == name,
            # what the decision was made from
            c.state == row["state"],
            c.attempts == row["attempts"],
            c.next_attempt_at == row["next_attempt_at"],
            c.rollout_id.is_(None)
            if row["rollout_id"] is None
            else c.rollout_id == row["rollout_id"],
            c.target_sha256.is_(None)
            if row["target_sha256"] is None
            else c.target_sha256 == row["target_sha256"],
            c.allow_downgrade == row["allow_downgrade"],
        )
        .values(**values)
    )
    if result.rowcount != 1:
        return False, None
    if event is not None:
        await events.record(conn, now, event[0], event[1], event[2], instance_id=instance["id"])
    return True, order


def _unchanged(row, values: dict[str, object]) -> bool:
    """Whether writing `values` would change nothing in `row` but its `updated_at`
    (which therefore says when the row last changed, not when it was last seen)."""
    return all(row[k] == v for k, v in values.items() if k != "updated_at")


async def instance_status(conn: AsyncConnection, component: str | None = None):
    q = (
        sa.select(instance_components, instances.c.name.label("instance_name"))
        .select_from(
            instance_components.join(instances, instances.c.id == instance_components.c.instance_id)
        )
        .where(instances.c.state.notin_([InstanceState.RETIRED, InstanceState.TERMINATED]))
        .order_by(instance_components.c.component, instances.c.name)
    )
    if component:
        q = q.where(instance_components.c.component == component)
    return (await conn.execute(q)).mappings().all()


async def failed_installs(conn: AsyncConnection):
    rows = await instance_status(conn)
    return [r for r in rows if r["state"] == ComponentState.INSTALL_FAILED]
