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

from corral.agent.server_calls import heartbeat_body
from corral.agent.state import (
    AgentState,
    AttemptStarted,
    Exit,
    FetchObject,
    HeartbeatFailed,
    HeartbeatReplied,
    Install,
    InstallDone,
    InstallFailed,
    KillAttempt,
    LeaseAnswered,
    LostReported,
    Register,
    Registered,
    RegisterFailed,
    RenewLease,
    ReportCopies,
    ReportLost,
    Retire,
    RunnerExited,
    SendHeartbeat,
    StartAttempt,
    Stored,
    Tick,
    TransferDone,
    TransferFailed,
)
from corral.api import (
    ComponentPublish,
    Fetch,
    HeartbeatReply,
    InstallOrder,
    JobSubmit,
    OutputFile,
    RolloutRequest,
    StartOrder,
)
from corral.domain.errors import StaleToken
from corral.domain.instances import Admission
from corral.server.api import agents as agents_api
from corral.server.app import close_context, open_context
from corral.server.auth import Principal
from corral.server.config import ServerConfig
from corral.server.context import ServerContext
from corral.server.leases import Renewed, flush_leases, instance_key, renew_by_request
from corral.server.loops.dispatcher import dispatch_once
from corral.server.loops.drainer import announce, drain_once
from corral.server.loops.reaper import reap_once
from corral.server.loops.reconciler import reconcile_once
from corral.store import components as components_repo
from corral.store import drain, instances
from corral.store import jobs as jobs_repo
from corral.store import objects as objects_repo

T0 = 1_000_000.0  # the virtual clock's start
ARTIFACT_SIZE = 37_000_000  # a runner build


def artifact_sha(name: str, version: str) -> str:
    return hashlib.sha256(f"artifact {name} {version}".encode()).hexdigest()


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
    p_net: float = 0.004  # each of: agent<->server cut, agent<->agent cut, duplicates, reorder
    p_disk: float = 0.003  # each of: slow disk, failing installs, a corrupt download
    p_newer_component: float = 0.15  # a new host comes with a newer runner than desired
    # switches the tests turn off to prove the checks catch what they name
    verify_downloads: bool = True
    cache_artifacts: bool = True
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
class Held:
    """A heartbeat held by the server as a long-poll: its reply so far, answered at
    `until`, or at once when the instance is woken (then exchanged again), or failed
    when the connection breaks (a partition, a server restart)."""

    hb: SendHeartbeat
    reply: HeartbeatReply
    until: float
    generation: int
    ctx: ServerContext


@dataclass
class Agent:
    """One simulated host: what is really on it (runners, objects, components, the
    artifact cache) and the agent process, whose decisions are the real
    `corral.agent.state.AgentState`'s."""

    name: str
    sm: AgentState = field(default_factory=AgentState)
    instance_id: str | None = None
    runners: dict[tuple[int, int], Runner] = field(default_factory=dict)
    objects: set[str] = field(default_factory=set)
    components: dict[str, tuple[str, str]] = field(default_factory=dict)  # on disk
    cache: set[str] = field(default_factory=set)  # artifact cache, by sha256
    inbox: list[tuple[float, int, object]] = field(default_factory=list)  # due, seq, event
    frozen_until: float = 0.0
    down_until: float | None = None  # killed; its supervisor restarts it then
    exited: bool = False  # heard `exit`: tombstone written, never restarted
    server_cut_until: float = 0.0  # agent <-> server partition
    peer_cut_until: float = 0.0  # agent <-> agent partition
    slow_disk_until: float = 0.0
    installs_fail_until: float = 0.0
    corrupt_downloads: int = 0  # the next downloads are an HTTP error page
    duplicate_until: float = 0.0  # replies delivered twice
    reorder_until: float = 0.0  # completions delivered late and out of order
    held: Held | None = None  # a heartbeat the server holds (a long-poll)

    @property
    def incarnation(self) -> int:
        return self.sm.incarnation

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
    agent_broken: list[str] = field(default_factory=list)  # AgentState.validate() failed
    install_orders: dict[tuple[str, str, str], int] = field(default_factory=dict)
    downloads: dict[tuple[str, str], int] = field(default_factory=dict)  # (agent, sha)
    desired: set[tuple[str, str]] = field(default_factory=set)  # (version, sha) ever desired
    undesired_orders: list[str] = field(default_factory=list)
    versions: dict[str, list[str]] = field(default_factory=dict)  # agent -> runner versions
    on_disk: list[tuple[str, str, str, str]] = field(default_factory=list)  # installs landed
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
        self.clock = Clock(T0)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="corral-sim-")
        self.data_dir = Path(data_dir) if data_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        # half the seeds have agents exchange every 3 s and renew their leases every
        # 1 s in between (the renewal requests of large fleets); the others exchange
        # every second, each exchange renewing the lease
        renewing = random.Random(f"lease/{settings.seed}").random() < 0.5
        self.config = ServerConfig(
            data_dir=self.data_dir,
            agent_grace=4,
            start_timeout=15,
            attempt_grace=20,
            drain_grace=60,
            retire_grace=5,
            transfer_timeout=30,
            heartbeat_base=3 if renewing else 1,
            lease_base=1,
            install_backoff=4,
            install_backoff_max=30,
            install_cap=3,
        )
        self._ctx: ServerContext | None = None
        self.agents: dict[str, Agent] = {}
        self.ledger = Ledger()
        self.job_plan: dict[int, tuple[float, int, int]] = {}  # duration, exit code, outputs
        self.retired_at: dict[str, float] = {}
        self._names = itertools.count(1)
        self._ids = itertools.count(1)
        self._saved_id_fn = instances.new_instance_id
        self._seq = itertools.count()
        self.published: dict[str, str] = {}
        self.rollout_at: float | None = T0 + settings.fault_seconds / 2
        # every seed restarts the server at least once, at a time of its own (the random
        # restarts are rare enough that a short run could otherwise have none)
        when = random.Random(f"restart/{settings.seed}").uniform(0.2, 0.8)
        self.restart_at: float | None = T0 + settings.fault_seconds * when

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
        for version in ("1.0.0", "1.1.0", "2.0.0"):
            await self.publish(version)
        await self.rollout("1.0.0")
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
        if self.rng.random() < self.s.p_newer_component:
            # a host whose image came with a newer runner than the fleet wants: it must be
            # held (no automatic downgrade), never downgraded
            agent.components["runner"] = ("2.0.0", artifact_sha("runner", "2.0.0"))
        agent.sm.installed = dict(agent.components)
        self.agents[agent.name] = agent
        self.ledger.versions.setdefault(agent.name, []).extend(
            v for v, _ in agent.components.values()
        )
        return agent

    def exit(self, agent: Agent) -> None:
        agent.exited = True
        for r in agent.live_runners():
            r.ended = "killed"

    def restart(self, agent: Agent) -> None:
        """The supervisor starts the agent again: a new process with the identity, the
        components and the runners it finds on disk."""
        sm = AgentState(instance_id=agent.instance_id)
        sm.installed = dict(agent.components)
        sm.held = set(agent.objects)
        for r in agent.live_runners():
            sm.adopt(r.job_id, r.attempt, r.token)
        agent.sm = sm
        agent.inbox.clear()
        agent.held = None  # the old process's connection is gone

    def still_faulty(self, agent: Agent) -> bool:
        """A fault's effect on this live agent is not over, or events for it are still
        on their way."""
        if agent.exited:
            return False
        t = self.now
        return (
            agent.down_until is not None
            or t < max(agent.frozen_until, agent.server_cut_until, agent.peer_cut_until)
            or t < agent.slow_disk_until
            or bool(agent.inbox)
        )

    # ---- one tick -------------------------------------------------------------------------

    async def step(self) -> None:
        self.clock.t += self.s.tick
        faults_on = self.now - T0 < self.s.fault_seconds
        if faults_on:
            await self.inject_faults()
        if self.rollout_at is not None and self.now >= self.rollout_at:
            self.rollout_at = None
            await self.rollout("1.1.0")
        loops = [dispatch_once, reap_once, drain_once, reconcile_once, flush_leases]
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
        rng, t, s = self.rng, self.now, self.s
        for agent in sorted(self.agents.values(), key=lambda a: a.name):
            if agent.exited or agent.down_until is not None:
                continue
            if rng.random() < s.p_freeze:
                agent.frozen_until = t + self.config.agent_grace * rng.uniform(1.5, 3)
                self.ledger.fault("agent_frozen_past_grace", t, agent.name)
            elif rng.random() < s.p_partition:
                # its runners live on and come back with stale tokens
                agent.frozen_until = t + self.config.agent_grace * rng.uniform(1.5, 3)
                for runner in agent.live_runners():  # each reconnects on its own
                    runner.mute_until = rng.uniform(t + self.config.agent_grace, agent.frozen_until)
                self.ledger.fault("host_partitioned_past_grace", t, agent.name)
            elif rng.random() < s.p_agent_kill:
                agent.down_until = t + rng.uniform(1, 6)  # runners outlive it
                self.ledger.fault("agent_killed", t, agent.name)
            if rng.random() < s.p_net:
                agent.server_cut_until = t + rng.uniform(1, 3 * self.config.agent_grace)
                self.ledger.fault("partition_agent_server", t, agent.name)
            if rng.random() < s.p_net:
                agent.peer_cut_until = t + rng.uniform(2, 30)
                self.ledger.fault("partition_agent_agent", t, agent.name)
            if rng.random() < s.p_disk:
                agent.slow_disk_until = t + rng.uniform(5, 30)
                self.ledger.fault("slow_disk", t, agent.name)
            if rng.random() < s.p_disk:
                agent.installs_fail_until = t + rng.uniform(10, 120)
                self.ledger.fault("failed_installs", t, agent.name)
            if rng.random() < s.p_disk:
                agent.corrupt_downloads += 1
                self.ledger.fault("corrupt_download", t, agent.name)
            if rng.random() < s.p_net:
                agent.duplicate_until = t + rng.uniform(5, 30)
                self.ledger.fault("duplicate_delivery", t, agent.name)
            if rng.random() < s.p_net:
                agent.reorder_until = t + rng.uniform(5, 30)
                self.ledger.fault("reordered_messages", t, agent.name)
            for runner in agent.live_runners():
                if rng.random() < s.p_runner_crash:
                    runner.ended = "crashed"
                    self.deliver(agent, RunnerExited(runner.job_id, runner.attempt, True, "died"))
                    self.ledger.fault("runner_crashed", t, f"{runner.job_id}/{runner.attempt}")
                elif rng.random() < s.p_runner_mute:
                    runner.mute_until = t + self.config.attempt_grace * rng.uniform(1.2, 2)
                    self.ledger.fault(
                        "runner_silent_past_grace", t, f"{runner.job_id}/{runner.attempt}"
                    )
        if rng.random() < s.p_drain:
            await self.drain_one()
        due = self.restart_at is not None and t >= self.restart_at
        if due or rng.random() < s.p_server_restart:
            self.restart_at = None
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

    # ---- components -----------------------------------------------------------------------

    async def publish(self, version: str) -> None:
        spec = ComponentPublish(
            name="runner",
            version=version,
            url=f"https://artifacts.sim/runner-{version}",
            sha256=artifact_sha("runner", version),
            size=ARTIFACT_SIZE,
        )
        await self.ctx.db.transact(components_repo.publish, spec, self.now)
        self.published[version] = spec.sha256

    async def rollout(self, version: str) -> None:
        req = RolloutRequest(
            component="runner", version=version, max_unavailable=100, failure_threshold=1000
        )
        await self.ctx.db.transact(components_repo.start_rollout, req, self.now)
        self.ledger.desired.add((version, self.published[version]))

    # ---- an agent: the real state machine, its instructions carried out here -------------

    def deliver(self, agent: Agent, event: object, delay: float = 0.0) -> None:
        """An event reaches the agent after `delay`; reordering delays some at random."""
        if self.now < agent.reorder_until and not isinstance(event, HeartbeatReplied | Stored):
            delay += self.rng.choice([0.0, 0.0, 1.0, 2.0])
        agent.inbox.append((self.now + delay, next(self._seq), event))

    async def agent_tick(self, agent: Agent) -> None:
        t = self.now
        if agent.exited:
            return
        if agent.down_until is not None:
            if t < agent.down_until:
                return
            agent.down_until = None
            self.restart(agent)
        if t < agent.frozen_until:
            return
        answered = await self.answer_held(agent)
        due = sorted(e for e in agent.inbox if e[0] <= t)
        agent.inbox = [e for e in agent.inbox if e[0] > t]
        events = [e for _, _, e in due if not isinstance(e, Stored)]
        if t < agent.reorder_until:
            self.rng.shuffle(events)
        # what is on the local disk the agent sees before anything it tells the server
        events = [e for _, _, e in due if isinstance(e, Stored)] + [*events, *answered, Tick()]
        for _ in range(50):  # a reply's orders can answer at once; never spin forever
            if not events or agent.exited:
                break
            event = events.pop(0)
            try:
                todo = agent.sm.handle(event, t)  # type: ignore[arg-type]
                agent.sm.validate()
            except AssertionError as exc:
                self.ledger.agent_broken.append(f"{agent.name}: {exc}")
                todo = agent.sm.last
            for instr in todo:
                events += await self.execute(agent, instr)
        for event in events:  # what did not fit in this tick comes next tick, never lost
            if not isinstance(event, Tick):
                agent.inbox.append((t + self.s.tick, next(self._seq), event))

    async def execute(self, agent: Agent, instr: object) -> list[object]:
        """Carry out one instruction as the daemon would, with the faults of the moment.
        Returns the events that follow at once; later ones go to the inbox."""
        t = self.now
        cut = t < agent.server_cut_until
        slow = self.rng.uniform(2, 8) if t < agent.slow_disk_until else 0.0
        match instr:
            case Register():
                if cut:
                    return [RegisterFailed("server unreachable", self.rng.random())]
                return [await self.register(agent)]
            case SendHeartbeat():
                if cut:
                    return [HeartbeatFailed("server unreachable", self.rng.random())]
                reply = await self.heartbeat(agent, instr)
                if t < agent.duplicate_until:
                    self.deliver(agent, HeartbeatReplied(reply, instr.seq), 1.0)
                if instr.wait > 0 and agents_api.ordered_nothing(reply):
                    # held as the route holds it: until the wait ends or a wake-up
                    key = instance_key(instr.instance_id)
                    until = t + min(instr.wait, reply.interval)
                    gen = self.ctx.notifier.generation(key)
                    agent.held = Held(instr, reply, until, gen, self.ctx)
                    return []
                return [HeartbeatReplied(reply, instr.seq)]
            case RenewLease():
                if cut:
                    return [LeaseAnswered(renewed=False)]
                # as the lease route does once the credential named the instance
                got = renew_by_request(self.ctx, instr.instance_id, instr.incarnation)
                return [
                    LeaseAnswered(
                        renewed=got is Renewed.RENEWED, exchange=got is not Renewed.RENEWED
                    )
                ]
            case StartAttempt():
                self.start_runner(agent, instr.order)
                self.deliver(agent, AttemptStarted(instr.order.job_id, instr.order.attempt), slow)
            case KillAttempt():
                r = agent.runners.get((instr.job_id, instr.attempt))
                if r is None or r.token != instr.token:
                    self.ledger.agent_broken.append(
                        f"{agent.name}: killed {instr.job_id}/{instr.attempt} with a wrong token"
                    )
                elif r.ended is None:
                    r.ended = "killed"
                    self.deliver(agent, RunnerExited(r.job_id, r.attempt, False, "killed"))
            case ReportLost():
                if cut:
                    return [LostReported(instr.job_id, instr.attempt, False)]
                try:
                    await self.ctx.db.transact(
                        jobs_repo.lose_attempt,
                        instr.job_id,
                        instr.attempt,
                        instr.reason,
                        t,
                        token=instr.token,
                    )
                except StaleToken:
                    pass  # a 409: the server already moved on
                return [LostReported(instr.job_id, instr.attempt, True)]
            case ReportCopies():
                # as the route does: copies made present, the drain steps they make
                # due run at once (a source may retire), their wake-ups
                if not cut:
                    landed = await self.ctx.db.transact(
                        drain.copies_landed,
                        self.ctx.db,
                        instr.instance_id,
                        instr.incarnation,
                        list(instr.sha256s),
                        t,
                        drain_grace=self.ctx.config.drain_grace,
                    )
                    announce(self.ctx, landed.steps, t)
                    if landed.step_due:
                        self.ctx.notifier.wake("drain")
            case FetchObject():
                ok = await self.copy(agent, instr.order)
                if ok:
                    self.deliver(agent, TransferDone(instr.order.sha256), slow)
                else:
                    self.deliver(agent, TransferFailed(instr.order.sha256, "no source served it"))
            case Install():
                self.deliver(agent, self.install(agent, instr.order), 1.0 + slow)
            case Exit():
                self.exit(agent)
        return []

    async def answer_held(self, agent: Agent) -> list[object]:
        """The end of a held heartbeat: its connection broke, its wait ended (the reply
        so far), or the instance was woken (the exchange runs again)."""
        h = agent.held
        if h is None:
            return []
        if self.now < agent.server_cut_until or h.ctx is not self.ctx:
            agent.held = None
            return [HeartbeatFailed("the held heartbeat's connection broke", self.rng.random())]
        if self.now >= h.until:
            agent.held = None
            return [HeartbeatReplied(h.reply, h.hb.seq)]
        if self.ctx.notifier.generation(instance_key(h.hb.instance_id)) != h.generation:
            agent.held = None
            return [HeartbeatReplied(await self.heartbeat(agent, h.hb), h.hb.seq)]
        return []

    async def register(self, agent: Agent) -> object:
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
            return Retire(reg.decision.reason)
        agent.instance_id = reg.instance["id"]
        return Registered(reg.instance["id"], reg.instance["incarnation"], 1.0)

    async def heartbeat(self, agent: Agent, hb: SendHeartbeat) -> HeartbeatReply:
        # the agent's own body; the hold is the simulator's (World.answer_held): the
        # handler itself must not wait on the real clock
        body = heartbeat_body(hb).model_copy(update={"wait": 0.0})
        who = Principal(kind="agent", token_id="sim", instance_id=hb.instance_id)
        reply = await agents_api.heartbeat(
            body=body, who=who, ctx=self.ctx, gone=agents_api.never_gone
        )
        if agent.instance_id in self.retired_at and (reply.start or reply.replicate):
            self.ledger.starts_to_retired.append(agent.name)
        for order in reply.install:
            key = (agent.name, order.component, order.sha256)
            self.ledger.install_orders[key] = self.ledger.install_orders.get(key, 0) + 1
            if (order.version, order.sha256) not in self.ledger.desired:
                self.ledger.undesired_orders.append(
                    f"{order.component} {order.version} to {agent.name}"
                )
        return reply

    def start_runner(self, agent: Agent, s: StartOrder) -> None:
        if any(r.job_id == s.job_id for r in agent.live_runners()):
            self.ledger.second_runner.append(f"{agent.name}: job {s.job_id}")
            return  # the per-job lock file keeps the second one from running
        duration, code, n_out = self.job_plan[s.job_id]
        outputs = [
            OutputFile(path=f"out{k}", sha256=output_sha(s.job_id, s.attempt, k), size=1 + k)
            for k in range(n_out)
        ]
        agent.runners[(s.job_id, s.attempt)] = Runner(
            s.job_id, s.attempt, s.token, duration, code, outputs
        )

    def install(self, agent: Agent, order: InstallOrder) -> object:
        """Download (unless cached), verify the sha256, self-test, then swap in: the
        outcome event. What is on disk changes only on success (I7)."""
        t = self.now
        if order.sha256 not in agent.cache:
            if agent.corrupt_downloads:
                agent.corrupt_downloads -= 1
                got = hashlib.sha256(b"<html>502 Bad Gateway</html>").hexdigest()
            else:
                got = order.sha256
                key = (agent.name, order.sha256)
                self.ledger.downloads[key] = self.ledger.downloads.get(key, 0) + 1
            if self.s.verify_downloads and got != order.sha256:
                return InstallFailed(order.component, order.sha256, "sha256 mismatch")
            agent.cache.add(got)
            if not self.s.cache_artifacts:
                agent.cache.discard(got)
        else:
            got = order.sha256
        if t < agent.installs_fail_until:
            why = "the new build failed its self-test"
            return InstallFailed(order.component, order.sha256, why)
        agent.components[order.component] = (order.version, got)
        self.ledger.versions.setdefault(agent.name, []).append(order.version)
        self.ledger.on_disk.append((agent.name, order.component, order.version, got))
        return InstallDone(order.component, order.version, got)

    async def copy(self, agent: Agent, f: Fetch) -> bool:
        """Fetch from a peer that holds it; the peer checks the token with the server."""
        sha = f.sha256
        state = (await self.ctx.db.query(instances.require_instance, agent.instance_id))["state"]
        if state != "running":
            self.ledger.copies_to_leaving.append(f"{sha[:12]} to {agent.name} ({state})")
        if self.now < agent.peer_cut_until:
            return False
        for url in f.sources:
            peer = self.agents.get(url.removeprefix("sim://").split("/", 1)[0])
            if peer is None or peer.exited or peer.down_until is not None:
                continue
            if self.now < max(peer.frozen_until, peer.peer_cut_until) or sha not in peer.objects:
                continue
            why = await self.ctx.db.transact(
                objects_repo.verify_grant, sha, f.token or "", self.now, recipient=agent.instance_id
            )
            if why is None:
                agent.objects.add(sha)
                return True
        return False

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
                if r.outputs:
                    self.deliver(agent, Stored(tuple(o.sha256 for o in r.outputs)))
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
                self.deliver(
                    agent,
                    RunnerExited(
                        r.job_id, r.attempt, False, "finished", tuple(o.sha256 for o in r.outputs)
                    ),
                )
                if recorded:
                    self.ledger.accepted.append((r.job_id, r.attempt, r.exit_code))
                    self.ledger.trace.append((round(t, 3), "finish", r.job_id, r.attempt))
            elif t - r.last_touch >= 2:
                await db.transact(jobs_repo.touch_attempt, r.job_id, r.attempt, r.token, t)
                r.last_touch = t
        except StaleToken:
            r.ended = "refused"  # the runner kills its command and exits on a 409
            self.deliver(agent, RunnerExited(r.job_id, r.attempt, False, "refused"))
            self.ledger.refused += 1
            self.ledger.trace.append((round(t, 3), "refused", r.job_id, r.attempt))
