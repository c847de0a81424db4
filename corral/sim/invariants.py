"""The invariants of ARCHITECTURE.md, checked against the database and what the
simulated agents and runners were told. Each check returns the violations it found,
as sentences."""

from __future__ import annotations

import itertools
from collections import Counter

from corral.domain.jobs import JobState
from corral.domain.versions import compare
from corral.sim.world import Ledger, World, output_sha
from corral.store import audit
from corral.store.db import Connection

FINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


async def at_most_one_live_attempt(conn: Connection) -> list[str]:
    """I1, at every moment: no job has two attempts that hold a valid token."""
    rows = await audit.jobs_with_several_live_attempts(conn)
    return [f"I1: job {j} has {n} live attempts at once" for j, n in rows]


async def nothing_new_on_retired(conn: Connection) -> list[str]:
    """I3, at every moment: no attempt and no replica placed on an instance after it
    retired."""
    attempts, copies = await audit.placed_after_retirement(conn)
    return [f"I3: attempt {j}/{n} placed on {i} after it retired" for j, n, i in attempts] + [
        f"I3: replica of {s[:12]} placed on {i} after it retired" for s, i in copies
    ]


def told_by_the_outside(ledger: Ledger) -> list[str]:
    """What the agents and runners saw: a refused update changed nothing, a leaving or
    retired instance was never sent work or data, one job never ran twice on one host."""
    return (
        [f"I1: a refused finish changed {j}" for j in ledger.refused_changed]
        + [f"I3: {a} got orders after it retired" for a in ledger.starts_to_retired]
        + [f"I3: copy of {c}" for c in ledger.copies_to_leaving]
        + [f"I1: second runner ordered for {s}" for s in ledger.second_runner]
    )


async def settled(world: World) -> list[str]:
    """At the end: every job final, its result from its final attempt and accepted
    once, attempts within max_attempts, every output of a succeeded job held by a live
    instance whose agent really has it."""
    out: list[str] = []
    accepted = Counter(j for j, _, _ in world.ledger.accepted)
    out += [f"I1: job {j} completed {n} times" for j, n in accepted.items() if n > 1]
    last = {j: (a, code) for j, a, code in world.ledger.accepted}
    async with world.ctx.db.read() as conn:
        rows = await audit.all_jobs(conn)
        outputs = await audit.all_job_outputs(conn)
        holders = await audit.present_holders(conn)
    for job in rows:
        j = job["id"]
        if job["state"] not in FINAL:
            out.append(f"job {j} is still {job['state']}")
            continue
        if job["current_attempt"] > job["max_attempts"]:
            out.append(
                f"I8: job {j} had {job['current_attempt']} attempts (max {job['max_attempts']})"
            )
        if job["result_attempt"] != job["current_attempt"]:
            out.append(
                f"I1: job {j}'s result is from attempt {job['result_attempt']}, "
                f"not its final attempt {job['current_attempt']}"
            )
        if j in last:
            if last[j] != (job["result_attempt"], job["exit_code"]):
                out.append(
                    f"I1: job {j} records attempt {job['result_attempt']} exit "
                    f"{job['exit_code']}, but the accepted finish was {last[j]}"
                )
        elif not (
            job["state"] == JobState.FAILED
            and job["exit_code"] is None
            and (job["reason"] or "").startswith("gave up after")
        ):
            out.append(
                f"I8: job {j} is {job['state']} with no accepted finish and no "
                f"give-up reason: {job['reason']!r}"
            )
    held: dict[str, set[str]] = {}
    for sha, name in holders:
        held.setdefault(sha, set()).add(name)
    by_id = {r["id"]: r for r in rows}
    for o in outputs:
        job = by_id[o["job_id"]]
        k = int(o["path"].removeprefix("out"))
        if o["sha256"] != output_sha(job["id"], job["result_attempt"], k):
            out.append(f"I1: job {job['id']} output {o['path']} is not its final attempt's")
        really = {
            n
            for n in held.get(o["sha256"], set())
            if o["sha256"] in world.agents[n].objects and not world.agents[n].exited
        }
        if not really:
            out.append(
                f"I2: output {o['path']} of job {job['id']} ({o['sha256'][:12]}) "
                f"is held by no live instance"
            )
    return out


def components(world: World) -> list[str]:
    """I4-I7 from what the agents were told and what landed on their disks."""
    ledger, out = world.ledger, []
    cap = world.config.install_cap
    for (agent, comp, sha), n in sorted(ledger.install_orders.items()):
        if n > cap:
            out.append(f"I4: {agent} got {n} install orders for {comp} {sha[:12]} (cap {cap})")
    for (agent, sha), n in sorted(ledger.downloads.items()):
        if n > 1:
            out.append(f"I4: {agent} downloaded artifact {sha[:12]} in full {n} times")
    out += [
        f"I5: install order for {o}, a version the database never desired"
        for o in ledger.undesired_orders
    ]
    for agent, seen in sorted(ledger.versions.items()):
        for before, after in itertools.pairwise(seen):
            if compare(after, before) < 0:
                out.append(f"I6: runner on {agent} went down from {before} to {after}")
    published = {(v, sha) for v, sha in world.published.items()}
    for agent, comp, version, sha in ledger.on_disk:
        if (version, sha) not in published:
            out.append(
                f"I7: {agent} has {comp} {version} on disk with sha256 {sha[:12]}, "
                "not the published artifact"
            )
    out += [f"agent: {b}" for b in ledger.agent_broken]
    return out
