"""The simulated world: one server's real loops and handlers on a real SQLite
database, driven by a virtual clock, with agents and runners modelled in-process and
faults injected from a seeded schedule.

Nothing here decides anything the server decides: placement, fencing, requeues,
drains and retirement are the store's and the loops' own code. The models only do
what an agent and a runner do on the wire (heartbeat, start, touch, finish, lose,
copy objects), at virtual times, and record what they were told and what was accepted,
so the invariants can be checked against both the database and the outside view.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from corral.api import HeartbeatRequest, JobSubmit, ObjectError, ObservedAttempt, OutputFile
from corral.domain.errors import StaleToken
from corral.domain.instances import Admission
from corral.server.api import agents as agents_api
from corral.server.app import close_context, open_context
from corral.server.auth import Principal
from corral.server.config import ServerConfig
from corral.server.context import ServerContext
from corral.server.loops.dispatcher import dispatch_once
from corral.server.loops.drainer import drain_once
from corral.server.loops.reaper import reap_once
from corral.store import drain, instances
from corral.store import jobs as jobs_repo
from corral.store import objects as objects_repo


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Settings:
    seed: int = 1
    jobs: int = 200
    agents: int = 4
    cpus_per_agent: int = 2
    fault_seconds: float = 240.0  # faults are injected only this long, then it settles
    limit_seconds: float = 3600.0  # virtual time by which everything must have settled
    tick: float = 1.0
    # per agent (or runner) and tick, while faults are on
    p_freeze: float = 0.004
    p_partition: float = 0.006  # the agent and its runners cut off together
    p_agent_kill: float = 0.004
    p_runner_crash: float = 0.004
    p_runner_mute: float = 0.004
    p_drain: float = 0.01  # per tick, the whole fleet
    p_server_restart: float = 0.006
    max_agents: int = 8


@dataclass
class Runner:
    job_id: int
    attempt: int
    token: str
    duration: float
    exit_code: int
    outputs: list[OutputFile]
    began_at: float | None = None
    last_touch: float = 0.0
    mute_until: float = 0.0
    ended: str | None = None  # finished | refused | killed | crashed
    reported: bool = False  # a crash reported to the server as lost


@dataclass
class Agent:
    name: str
    instance_id: str | None = None
    incarnation: int = 0
    runners: dict[tuple[int, int], Runner] = field(default_factory=dict)
    objects: set[str] = field(default_factory=set)
    copy_errors: dict[str, str] = field(default_factory=dict)
    frozen_until: float = 0.0
    down_until: float | None = None  # killed; its supervisor restarts it then
    exited: bool = False  # heard `exit`: tombstone written, never restarted

    def live_runners(self) -> list[Runner]:
        return [r for r in self.runners.values() if r.ended is None]


@dataclass
class Ledger:
    """What the outside world saw: every result the server accepted, every update it
    refused, every order given, every fault injected."""

    accepted: list[tuple[int, int, int]] = field(default_factory=list)  # job, attempt, code
    refused: int = 0
    refused_changed: list[str] = field(default_factory=list)
    starts_to_retired: list[str] = field(default_factory=list)
    copies_to_leaving: list[str] = field(default_factory=list)
    second_runner: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    trace: list[tuple] = field(default_factory=list)

    def fault(self, kind: str, t: float, who: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1
        self.trace.append((round(t, 3), "fault", kind, who))


def output_sha(job_id: int, attempt: int, k: int) -> str:
    """What output k of this attempt contains (attempts differ, so a recorded output
    shows which attempt wrote it)."""
    return hashlib.sha256(f"{job_id}/{attempt}/{k}".encode()).hexdigest()


class World:
    def __init__(self, settings: Settings, data_dir: Path | None = None) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.clock = Clock(1_000_000.0)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="corral-sim-")
        self.data_dir = Path(data_dir) if data_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.config = ServerConfig(
            data_dir=self.data_dir,
            agent_grace=4,
            start_timeout=15,
            attempt_grace=20,
            drain_grace=60,
            retire_grace=5,
            transfer_timeout=30,
            heartbeat_base=1,
        )
        self._ctx: ServerContext | None = None
        self.agents: dict[str, Agent] = {}
        self.ledger = Ledger()
        self.job_plan: dict[int, tuple[float, int, int]] = {}  # duration, exit code, outputs
        self.retired_at: dict[str, float] = {}
        self._names = itertools.count(1)
        self._ids = itertools.count(1)
        self._saved_id_fn = instances.new_instance_id

    @property
    def now(self) -> float:
        return self.clock.t

    # ---- set-up ---------------------------------------------------------------------------

    @property
    def ctx(self) -> ServerContext:
        if self._ctx is None:
            raise RuntimeError("the simulated server is not open")
        return self._ctx

    async def __aenter__(self) -> World:
        # instance ids from a counter, so a seed replays the same placements
        instances.new_instance_id = lambda: f"i-{next(self._ids):05d}"
        # the report says what happened; thousands of expected WARNINGs would drown it
        self._saved_log_level = logging.getLogger("corral").level
        logging.getLogger("corral").setLevel(logging.ERROR)
        self._ctx = await open_context(self.config, clock=self.clock)
        for _ in range(self.s.agents):
            await self.add_agent()
        for _ in range(self.s.jobs):
            job_id = await self.ctx.db.transact(
                jobs_repo.submit, JobSubmit(command=["sim"], cpus=1, memory_mb=1), self.now
            )
            self.job_plan[job_id] = (
                self.rng.uniform(1, 12),
                0 if self.rng.random() < 0.9 else 1,
                self.rng.choice([0, 1, 1, 2]),
            )
        return self

    async def __aexit__(self, *exc) -> None:
        instances.new_instance_id = self._saved_id_fn
        logging.getLogger("corral").setLevel(self._saved_log_level)
        if self._ctx is not None:
            await close_context(self._ctx)
        if self._tmp is not None:
            self._tmp.cleanup()

    async def add_agent(self) -> Agent:
        agent = Agent(name=f"sim{next(self._names)}")
        self.agents[agent.name] = agent
        await self.register(agent)
        return agent

    async def register(self, agent: Agent) -> None:
        reg = await self.ctx.db.transact(
            instances.register,
            name=agent.name,
            instance_id=agent.instance_id,
            cpus=self.s.cpus_per_agent,
            memory_mb=1 << 20,
            host=None,
            agent_version=None,
            fleet=None,
            peer_url=f"sim://{agent.name}",
            now=self.now,
        )
        if reg.decision.admission is Admission.EXIT or reg.instance is None:
            self.exit(agent)
            return
        agent.instance_id = reg.instance["id"]
        agent.incarnation = reg.instance["incarnation"]

    def exit(self, agent: Agent) -> None:
        agent.exited = True
        for r in agent.live_runners():
            r.ended = "killed"

    # ---- one tick -------------------------------------------------------------------------

    async def step(self) -> None:
        self.clock.t += self.s.tick
        faults_on = self.now - 1_000_000.0 < self.s.fault_seconds
        if faults_on:
            await self.inject_faults()
        loops = [dispatch_once, reap_once, drain_once]
        self.rng.shuffle(loops)
        for body in loops:
            await body(self.ctx)
        order = sorted(self.agents.values(), key=lambda a: a.name)
        self.rng.shuffle(order)
        for agent in order:
            await self.agent_tick(agent)
            for runner in list(agent.runners.values()):
                await self.runner_tick(agent, runner)

    async def inject_faults(self) -> None:
        rng, t = self.rng, self.now
        for agent in sorted(self.agents.values(), key=lambda a: a.name):
            if agent.exited or agent.down_until is not None:
                continue
            if rng.random() < self.s.p_freeze:
                agent.frozen_until = t + self.config.agent_grace * rng.uniform(1.5, 3)
                self.ledger.fault("agent_frozen_past_grace", t, agent.name)
            elif rng.random() < self.s.p_partition:
                # its runners live on and come back with stale tokens
                agent.frozen_until = t + self.config.agent_grace * rng.uniform(1.5, 3)
                for runner in agent.live_runners():  # each reconnects on its own
                    runner.mute_until = rng.uniform(t + self.config.agent_grace, agent.frozen_until)
                self.ledger.fault("host_partitioned_past_grace", t, agent.name)
            elif rng.random() < self.s.p_agent_kill:
                agent.down_until = t + rng.uniform(1, 6)  # runners outlive it
                self.ledger.fault("agent_killed", t, agent.name)
            for runner in agent.live_runners():
                if rng.random() < self.s.p_runner_crash:
                    runner.ended = "crashed"
                    self.ledger.fault("runner_crashed", t, f"{runner.job_id}/{runner.attempt}")
                elif rng.random() < self.s.p_runner_mute:
                    runner.mute_until = t + self.config.attempt_grace * rng.uniform(1.2, 2)
                    self.ledger.fault(
                        "runner_silent_past_grace", t, f"{runner.job_id}/{runner.attempt}"
                    )
        if rng.random() < self.s.p_drain:
            await self.drain_one()
        if rng.random() < self.s.p_server_restart:
            await close_context(self.ctx)
            self._ctx = await open_context(self.config, clock=self.clock)
            self.ledger.fault("server_restarted", t, "server")

    async def drain_one(self) -> None:
        rows = await self.ctx.db.query(instances.list_instances)
        running = sorted(r["id"] for r in rows if r["state"] == "running")
        if len(running) < 2:
            return
        victim = self.rng.choice(running)
        await self.ctx.db.transact(drain.request_drain, victim, False, self.now)
        self.ledger.fault("drain", self.now, victim)
        live = [a for a in self.agents.values() if not a.exited]
        if len(live) < self.s.max_agents:
            await self.add_agent()

    # ---- an agent -------------------------------------------------------------------------

    async def agent_tick(self, agent: Agent) -> None:
        t = self.now
        if agent.exited:
            return
        if agent.down_until is not None:
            if t < agent.down_until:
                return
            agent.down_until = None
            await self.register(agent)  # same id, next incarnation
            if agent.exited:
                return
        if t < agent.frozen_until:
            return
        for r in agent.runners.values():  # the supervisor reaps runners that died
            if r.ended == "crashed" and not r.reported:
                r.reported = True
                try:
                    await self.ctx.db.transact(
                        jobs_repo.lose_attempt, r.job_id, r.attempt, "runner died", t, token=r.token
                    )
                except StaleToken:
                    pass
        if agent.instance_id is None:
            return  # not registered yet
        body = HeartbeatRequest(
            instance_id=agent.instance_id,
            incarnation=agent.incarnation,
            attempts=[
                ObservedAttempt(job_id=r.job_id, attempt=r.attempt, token=r.token)
                for r in agent.live_runners()
            ],
            objects=sorted(agent.objects),
            object_errors=[ObjectError(sha256=s, error=e) for s, e in agent.copy_errors.items()],
        )
        agent.copy_errors.clear()
        who = Principal(kind="agent", token_id="sim", instance_id=agent.instance_id)
        reply = await agents_api.heartbeat(body=body, who=who, ctx=self.ctx)
        if reply.action == "exit":
            self.exit(agent)
            return
        for k in reply.kill:
            doomed = agent.runners.get((k.job_id, k.attempt))
            if doomed is not None and doomed.ended is None:
                doomed.ended = "killed"
        if agent.instance_id in self.retired_at and (reply.start or reply.replicate):
            self.ledger.starts_to_retired.append(agent.name)
        for s in reply.start:
            if any(r.job_id == s.job_id for r in agent.live_runners()):
                self.ledger.second_runner.append(f"{agent.name}: job {s.job_id}")
                continue  # the per-job lock file keeps the second one from running
            duration, code, n_out = self.job_plan[s.job_id]
            outputs = [
                OutputFile(path=f"out{k}", sha256=output_sha(s.job_id, s.attempt, k), size=1 + k)
                for k in range(n_out)
            ]
            agent.runners[(s.job_id, s.attempt)] = Runner(
                s.job_id, s.attempt, s.token, duration, code, outputs
            )
        for f in reply.replicate:
            await self.copy(agent, f.sha256, f.sources, f.token)

    async def copy(self, agent: Agent, sha: str, sources: list[str], token: str | None) -> None:
        """Fetch from a peer that holds it; the peer checks the token with the server."""
        state = (await self.ctx.db.query(instances.require_instance, agent.instance_id))["state"]
        if state != "running":
            self.ledger.copies_to_leaving.append(f"{sha[:12]} to {agent.name} ({state})")
        for url in sources:
            peer = self.agents.get(url.removeprefix("sim://").split("/", 1)[0])
            if peer is None or peer.exited or peer.down_until is not None:
                continue
            if self.now < peer.frozen_until or sha not in peer.objects:
                continue
            why = await self.ctx.db.transact(
                objects_repo.verify_grant, sha, token or "", self.now, recipient=agent.instance_id
            )
            if why is None:
                agent.objects.add(sha)
                return
        agent.copy_errors[sha] = "no source could serve it"

    # ---- a runner -------------------------------------------------------------------------

    async def runner_tick(self, agent: Agent, r: Runner) -> None:
        t = self.now
        if r.ended is not None or t < r.mute_until:
            return
        db = self.ctx.db
        try:
            if r.began_at is None:
                await db.transact(jobs_repo.start_attempt, r.job_id, r.attempt, r.token, t)
                r.began_at = r.last_touch = t
            elif t - r.began_at >= r.duration:
                for o in r.outputs:  # written to the agent's store before the finish
                    agent.objects.add(o.sha256)
                before = await db.query(jobs_repo.get_job, r.job_id)
                try:
                    _, recorded = await db.transact(
                        jobs_repo.finish_attempt,
                        r.job_id,
                        r.attempt,
                        r.token,
                        r.exit_code,
                        None,
                        t,
                        r.outputs,
                    )
                except StaleToken:
                    after = await db.query(jobs_repo.get_job, r.job_id)
                    if dict(after or {}) != dict(before or {}):
                        self.ledger.refused_changed.append(f"job {r.job_id}")
                    raise
                r.ended = "finished"
                if recorded:
                    self.ledger.accepted.append((r.job_id, r.attempt, r.exit_code))
                    self.ledger.trace.append((round(t, 3), "finish", r.job_id, r.attempt))
            elif t - r.last_touch >= 2:
                await db.transact(jobs_repo.touch_attempt, r.job_id, r.attempt, r.token, t)
                r.last_touch = t
        except StaleToken:
            r.ended = "refused"  # the runner kills its command and exits on a 409
            self.ledger.refused += 1
            self.ledger.trace.append((round(t, 3), "refused", r.job_id, r.attempt))
