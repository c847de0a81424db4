"""The agent daemon: the I/O shell of the agent's state machine.

`corral.agent.state.AgentState` makes every decision (when to register and heartbeat,
which attempts to start, kill or report lost, which objects to copy or upload, which
components to install, when to exit). This shell only turns what happens into its
events (a server's reply, a runner found gone, a transfer done, a timer tick, SIGTERM)
and carries out the instructions it returns with the I/O pieces: the servers
(`server_calls`), the runner supervisor, the installer, the object store and its
transfers (`executors`), the self-update and the attempt sandbox.

Each heartbeat carries the observed state up (the attempts this instance runs, with
their tokens) and brings the desired state down (attempts to start, attempts to kill,
or `exit`). An agent told to exit writes a tombstone and exits with
AGENT_EXIT_RETIRED, so no supervisor brings it back. If the server is unreachable the
agent keeps its jobs running and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import corral
from corral.agent import executors, server_calls
from corral.agent.artifacts import ArtifactCache, Installer
from corral.agent.diskguard import DiskGuard
from corral.agent.identity import (
    Identity,
    join_key,
    load_identity,
    read_tombstone,
    save_identity,
    write_tombstone,
)
from corral.agent.objects import ObjectStore
from corral.agent.peer import PeerServer
from corral.agent.relay_server import SEND_WITHIN, RelayServer
from corral.agent.sandbox import host as sandbox_host
from corral.agent.sandbox.cgroups import cgroup_mounts
from corral.agent.selfupdate import VERSION_ENV, SelfUpdate
from corral.agent.startreports import StartReports
from corral.agent.state import (
    RECONNECT,
    AgentState,
    AttemptStarted,
    Event,
    Exit,
    FetchObject,
    HeartbeatFailed,
    HeartbeatReplied,
    Install,
    InstallDone,
    Instruction,
    KillAttempt,
    LeaseAnswered,
    LostReported,
    OffloadObject,
    Register,
    Registered,
    RegisterFailed,
    RenewLease,
    ReportCopies,
    ReportLost,
    RolledBack,
    RunnerExited,
    SendHeartbeat,
    StartAttempt,
    StartFailed,
    Stop,
    Stored,
    Tick,
)
from corral.agent.supervisor import Supervisor
from corral.agent.upstream import Unreachable
from corral.agent.upstream_async import AsyncServer
from corral.api import RegisterRequest, StartOrder
from corral.domain.instances import AGENT_EXIT_RETIRED, AGENT_EXIT_SUPERSEDED
from corral.domain.sandbox import (
    DEFAULT_JOB_NETWORK,
    DEFAULT_JOB_USER,
    DEFAULT_MAX_PIDS,
    slow_group_moves,
)
from corral.heap import settle_heap

log = logging.getLogger("corral.agent")

__all__ = ["RECONNECT", "Agent", "AgentConfig"]

TICK = 0.5  # how often runners are reaped, the object store looked at, timers fired
JOURNAL = 10_000  # the last events and the instructions they gave, for tests and debugging
REPORT_WITHIN = 5.0  # a lost attempt's report; when exiting, 2 s
EXIT_REPORT_WITHIN = 2.0


@dataclass
class AgentConfig:
    servers: list[str]
    data_dir: Path
    name: str
    join_token: str | None = None
    join_token_file: Path | None = None  # where join_token came from (kept across a switch)
    fleet: str | None = None
    cpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    memory_mb: int = field(default_factory=lambda: psutil.virtual_memory().total // 2**20)
    exit_with_parent: bool = False
    log_level: str = "info"
    switch_timeout: float = 60.0  # a new agent build must heartbeat within this
    peer_host: str = "127.0.0.1"
    peer_port: int = 0
    peer_url: str | None = None  # how other agents reach this one (default from host:port)
    job_user: str = DEFAULT_JOB_USER  # a root agent's jobs run as this user
    jobs_dir: Path | None = None  # where attempts' private directories go
    hide: list[Path] = field(default_factory=list)  # more paths jobs must not see
    max_pids: int = DEFAULT_MAX_PIDS  # each attempt's processes and threads (0: no own cap)
    job_network: str = DEFAULT_JOB_NETWORK  # a root agent's attempts: "isolated" | "host"
    disk_reserve_mb: int | None = None  # kept free where jobs write (None: 5%, at most 2 GiB)

    def argv(self) -> list[str]:
        """The options that start this same agent again (after a switch of builds)."""
        args = [
            "--data-dir",
            str(self.data_dir),
            "--name",
            self.name,
            "--cpus",
            str(self.cpus),
            "--memory",
            str(self.memory_mb),
            "--log-level",
            self.log_level,
        ]
        for s in self.servers:
            args += ["--server", s]
        if self.fleet:
            args += ["--fleet", self.fleet]
        if self.join_token_file is not None:  # a path: the token itself is never an argument
            args += ["--join-token-file", str(self.join_token_file)]
        if self.exit_with_parent:
            args.append("--exit-with-parent")
        args += ["--peer-host", self.peer_host, "--peer-port", str(self.peer_port)]
        if self.peer_url:
            args += ["--peer-url", self.peer_url]
        args += ["--job-user", self.job_user]
        if self.jobs_dir:
            args += ["--jobs-dir", str(self.jobs_dir)]
        for path in self.hide:
            args += ["--hide", str(path)]
        if self.max_pids != DEFAULT_MAX_PIDS:  # (a build from before the option starts too)
            args += ["--max-pids", str(self.max_pids)]
        if self.job_network != DEFAULT_JOB_NETWORK:
            args += ["--job-network", self.job_network]
        if self.disk_reserve_mb is not None:
            args += ["--disk-reserve", str(self.disk_reserve_mb)]
        return [*args, "--switch-timeout", str(self.switch_timeout)]


class Agent:
    """The I/O shell. Its own state is what I/O needs (the identity's credential, tasks
    in flight, runner handles in the supervisor); what the agent knows is `state`."""

    def __init__(self, config: AgentConfig, state: AgentState | None = None):
        self.config = config
        self.data_dir = config.data_dir
        self.state = state if state is not None else AgentState()
        self.identity: Identity | None = None
        self.server = AsyncServer(config.servers, timeout=30)
        self.installer = Installer(self.data_dir, ArtifactCache(self.data_dir / "cache"))
        self.objects = ObjectStore(self.data_dir)
        self.peer: PeerServer | None = None
        self.peer_url: str | None = None
        self.relay: RelayServer | None = None
        self.relay_refused_until = 0.0  # a server without the relay route: not asked again soon
        self.start_reports = StartReports()  # the next exchange lets them go first
        self.fetch_slots = asyncio.Semaphore(4)  # copies streaming at once
        self.fetch_ahead = asyncio.Semaphore(4)  # and opening their source meanwhile
        self.supervisor = Supervisor(self.data_dir, config.servers, installer=self.installer)
        self.selfupdate = SelfUpdate(
            self.data_dir, self.installer, config.argv(), config.switch_timeout
        )
        self.sandbox: sandbox_host.Host | None = None
        self.disk_guard: DiskGuard | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.journal: deque[tuple[Event, tuple[Instruction, ...]]] = deque(maxlen=JOURNAL)
        self.tasks: set[asyncio.Task] = set()  # register, heartbeat, transfers, installs
        self.reports: set[asyncio.Task] = set()  # lost attempts being reported
        self.reaped: set[tuple[int, int]] = set()  # runners found gone, not yet forgotten
        self.exit: Exit | None = None
        self._parent = os.getppid()

    @property
    def me(self) -> Identity:
        """This instance's identity (registration sets it before anything needs it)."""
        if self.identity is None:
            raise RuntimeError("not registered")
        return self.identity

    # -- start and stop ----------------------------------------------------------------------

    async def run(self) -> int:
        tomb = read_tombstone(self.data_dir)
        if tomb is not None:
            log.error(
                "this instance was retired (%s); it will not run again. Remove %s to "
                "join as a new instance.",
                tomb.get("reason"),
                self.data_dir,
            )
            return AGENT_EXIT_RETIRED
        self.selfupdate.on_start()  # may re-execute into the committed agent build
        try:
            self.sandbox = await asyncio.to_thread(
                sandbox_host.detect,
                self.data_dir,
                self.config.job_user,
                self.config.jobs_dir,
                self.config.hide,
                self.config.max_pids,
                self.config.job_network,
                self.config.memory_mb,
            )
        except (sandbox_host.SandboxError, OSError) as exc:
            log.error("cannot set up the attempt sandbox: %s", exc)
            return 2
        self.supervisor.host = self.sandbox
        self.disk_guard = DiskGuard(self.sandbox.jobs_dir, self.config.disk_reserve_mb)
        log.info("attempt sandbox: %s", self.sandbox.description)
        for warning in self.sandbox.warnings:
            log.warning("attempt sandbox: %s", warning)
        if self.sandbox.cgroups is not None and slow_group_moves(cgroup_mounts()):
            log.info(
                "attempt sandbox: each command waits for the kernel to move it into its "
                "cgroup (8-30 ms after a quiet spell); mounting cgroup2 with "
                "`favordynmods` (Linux 6.0+) makes that well under a millisecond"
            )
        self.identity = load_identity(self.data_dir)
        await self.start_peer()
        await self.start_relay()
        self.supervisor.adopt()
        self.load_state()
        settle_heap()
        watchdog = asyncio.get_running_loop().create_task(self._watch_parent())
        try:
            return await self.drive()
        finally:
            watchdog.cancel()
            for task in self.tasks:
                task.cancel()
            if self.sandbox is not None:
                self.sandbox.close()  # empty parent groups and jobs dir only
            if self.peer is not None:
                self.peer.stop()
            if self.relay is not None:
                await self.relay.stop()
            await self.server.close()

    def guard_disk(self) -> None:
        """Free space where jobs write fell below the reserve: the attempt holding the
        most is ended, as its job's failure (blocking: off the event loop)."""
        if self.disk_guard is None:
            return
        found = self.disk_guard.check(self.supervisor.job_dirs)
        if found is not None:
            (job_id, attempt), reason = found
            self.supervisor.evict(job_id, attempt, reason)

    def load_state(self) -> None:
        """What the machine starts from is what this process finds on disk: the
        identity, the installed components, the objects held, the runners an earlier
        process left running, a rolled-back agent build to report."""
        st = self.state
        st.instance_id = self.identity.instance_id if self.identity else None
        for c in self.installer.all_installed():
            st.installed[c.name] = (c.version, c.sha256)
        st.held.update(self.objects.list())
        for t in self.supervisor.tracked.values():
            st.adopt(t.job_id, t.attempt, t.token)
        if self.selfupdate.rollback_error is not None:
            self.events.put_nowait(RolledBack(*self.selfupdate.rollback_error))

    def stop(self) -> None:
        """SIGTERM: the machine kills the runners, reports them lost and exits."""
        self.events.put_nowait(Stop())

    async def _watch_parent(self) -> None:
        if not self.config.exit_with_parent:
            return
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != self._parent:
                log.warning("parent process %d is gone; stopping", self._parent)
                self.stop()
                return

    # -- the loop: events in, instructions out ------------------------------------------------

    async def drive(self) -> int:
        """Feed the machine until it says exit: events as they come, a tick (runners
        reaped, the object store looked at) every TICK, and a timer tick when the
        machine's next contact is due."""
        next_tick = 0.0
        while self.exit is None:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                await self.tick()
                continue
            due = next_tick
            if self.state.in_flight is None:
                due = min(due, max(now, self.state.next_contact_at))
            lease_due = self.state.lease_due()
            if lease_due is not None:
                due = min(due, max(now, lease_due))
            try:
                event = await asyncio.wait_for(self.events.get(), due - now)
            except TimeoutError:
                event = Tick()
            await self.feed(event)
        return self.exit.code

    async def tick(self) -> None:
        self.selfupdate.check_deadline()  # a trial build that never heartbeat rolls back
        await asyncio.to_thread(self.guard_disk)
        ended = await asyncio.to_thread(self.supervisor.reap)
        held = await asyncio.to_thread(self.objects.list)
        events: list[Event] = []
        new = set(held) - self.state.held
        if new:  # a runner's outputs (it reports them itself)
            events.append(Stored(tuple(sorted(new))))
        for e in ended:
            self.reaped.add((e.job_id, e.attempt))
            events.append(RunnerExited(e.job_id, e.attempt, e.report_lost, e.reason))
        for event in [*events, Tick()]:
            await self.feed(event)

    async def feed(self, event: Event) -> None:
        """Hand one event to the machine and carry out what it says (an instruction
        done at once may give events of its own: they go in next)."""
        pending = deque([event])
        while pending and self.exit is None:
            event = pending.popleft()
            now = time.monotonic()
            out = self.state.handle(event, now)
            if out or not isinstance(event, Tick):
                self.journal.append((event, tuple(out)))
            if isinstance(event, RegisterFailed | HeartbeatFailed):
                log.warning(
                    "cannot reach a server (%s); jobs keep running; retry in %.1fs",
                    event.error,
                    max(0.0, self.state.next_contact_at - now),
                )
            for instruction in out:
                pending.extend(await self.execute(instruction))
            self._forget_gone()

    async def execute(self, instruction: Instruction) -> list[Event]:
        """Carry out one instruction. Starting and killing runners is done here and
        now (their outcome is the next event); the rest runs in the background and
        posts its outcome to the event queue."""
        match instruction:
            case Register():
                self._spawn(self._register())
            case SendHeartbeat():
                self._spawn(self._heartbeat(instruction))
            case RenewLease():
                self._spawn(self._one(self._renew_lease(instruction)))
            case StartAttempt():
                return [await self._start(instruction.order)]
            case KillAttempt(job_id=job, attempt=n, reason=reason):
                await asyncio.to_thread(self.supervisor.kill, job, n, reason)
                return [RunnerExited(job, n, False, "killed")]
            case ReportLost():
                within = EXIT_REPORT_WITHIN if self.state.exit_code is not None else REPORT_WITHIN
                task = asyncio.get_running_loop().create_task(self._report(instruction, within))
                self.reports.add(task)
                task.add_done_callback(self.reports.discard)
            case FetchObject(order=order):
                fetch = executors.fetch(
                    self.objects, order, self.me.instance_id, self.fetch_slots, self.fetch_ahead
                )
                self._spawn(self._one(fetch))
            case ReportCopies():
                self._spawn(self._report_copies(instruction))
            case OffloadObject(order=order):
                self._spawn(self._one(executors.offload(self.objects, order, self.fetch_slots)))
            case Install(order=order):
                self._spawn(self._install(instruction))
            case Exit():
                await self._exit(instruction)
        return []

    def _spawn(self, work: Awaitable[list[Event]]) -> None:
        async def post() -> None:
            for event in await work:
                self.events.put_nowait(event)

        task = asyncio.get_running_loop().create_task(post())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _one(work: Awaitable[Event]) -> list[Event]:
        return [await work]

    def _forget_gone(self) -> None:
        """A reaped runner's attempt directory goes once the machine is done with it
        (an attempt lost keeps it until the server has heard, so a restarted agent
        would report it again)."""
        for key in [k for k in self.reaped if k not in self.state.attempts]:
            self.supervisor.forget(*key)
            self.reaped.discard(key)

    # -- executors ----------------------------------------------------------------------------

    def _register_body(self) -> dict:
        ident = self.identity
        return RegisterRequest(
            name=ident.name if ident else self.config.name,
            instance_id=ident.instance_id if ident else None,
            cpus=self.config.cpus,
            memory_mb=self.config.memory_mb,
            host=socket.gethostname(),
            agent_version=os.environ.get(VERSION_ENV) or corral.__version__,
            fleet=self.config.fleet,
            peer_url=self.peer_url,
            sandbox=self.sandbox.description if self.sandbox else None,
            sandbox_warnings=self.sandbox.warnings if self.sandbox else [],
            join_key=None if ident else join_key(self.data_dir),
        ).model_dump()

    async def _register(self) -> list[Event]:
        """Register (first time, with the join token) or again (with the instance's
        credential)."""
        ident = self.identity
        secret = ident.credential if ident else self.config.join_token
        try:
            event, reply = await server_calls.register(
                self.server, self._register_body(), secret, ident is not None
            )
        except Exception as exc:  # e.g. a reply that is not what the API says
            log.exception("registration broke")
            return [RegisterFailed(repr(exc), random.random())]
        if isinstance(event, Registered) and reply is not None:
            if ident is None and event.credential is not None:
                self.identity = Identity(event.instance_id, event.credential, self.config.name)
                save_identity(self.data_dir, self.identity)
            self.supervisor.instance_id = event.instance_id
            log.info(
                "registered as %s (%s), incarnation %s, state %s",
                self.me.name,
                event.instance_id,
                event.incarnation,
                reply.state,
            )
        return [event]

    async def _renew_lease(self, order: RenewLease) -> Event:
        try:
            return await server_calls.renew_lease(self.server, order, self.me.credential)
        except Exception:
            log.exception("lease renewal broke")
            return LeaseAnswered(renewed=False)

    async def _heartbeat(self, hb: SendHeartbeat) -> list[Event]:
        await self.start_reports.settled()
        try:
            event = await server_calls.heartbeat(
                self.server, hb, self.me.credential, self.state.interval
            )
        except Exception as exc:  # e.g. a reply that is not what the API says
            log.exception("heartbeat broke")
            return [HeartbeatFailed(repr(exc), random.random())]
        if isinstance(event, HeartbeatReplied) and event.reply.action != "exit":
            self.selfupdate.heartbeat_ok()  # a new agent build that heartbeats is committed
            if self.selfupdate.rollback_error:
                self.selfupdate.error_reported()
            if event.reply.offload:  # a runner's fresh outputs the last scan missed
                new = set(await asyncio.to_thread(self.objects.list)) - self.state.held
                if new:
                    return [Stored(tuple(sorted(new))), event]
        return [event]

    async def _report_copies(self, report: ReportCopies) -> list[Event]:
        """Best effort: the next heartbeat's object list reports them all the same."""
        try:
            await server_calls.report_copies(self.server, report, self.me.credential)
        except Exception:  # a bug: say so; the heartbeat carries the report
            log.exception("the report of copies %s broke", [s[:12] for s in report.sha256s])
        return []

    async def _start(self, order: StartOrder) -> Event:
        try:  # off the loop: a zygote that is slow to answer must not stall heartbeats
            await asyncio.to_thread(self.supervisor.start, order)
        except OSError as exc:  # e.g. a full disk: that attempt cannot run here
            log.warning("cannot start attempt %s/%s: %s", order.job_id, order.attempt, exc)
            return StartFailed(order.job_id, order.attempt, f"the agent cannot start it: {exc}")
        if self.relay is not None:
            self.start_reports.started(order.job_id, order.attempt)
        return AttemptStarted(order.job_id, order.attempt)

    async def _report(self, order: ReportLost, within: float) -> None:
        try:
            event = await server_calls.report_lost(self.server, order, within)
        except Exception:  # a bug: say so; the machine reports it again later
            log.exception("the report of lost attempt %s/%s broke", order.job_id, order.attempt)
            event = LostReported(order.job_id, order.attempt, False)
        if event.delivered:
            log.warning("attempt %s/%s lost (%s)", order.job_id, order.attempt, order.reason)
        if self.exit is None:
            self.events.put_nowait(event)

    async def _install(self, instruction: Install) -> list[Event]:
        order = instruction.order
        event = await executors.install(self.installer, order, self._auth_for(order.url))
        if order.component == "agent" and isinstance(event, InstallDone):
            self.selfupdate.switch_if_needed()  # re-executes into the new build
        return [event]

    async def _exit(self, instruction: Exit) -> None:
        if self.reports:  # lost attempts' reports (each has its own deadline)
            await asyncio.wait(set(self.reports))
        if instruction.tombstone:
            log.warning("told to exit: %s; writing tombstone", instruction.reason)
            write_tombstone(
                self.data_dir,
                self.identity.instance_id if self.identity else None,
                instruction.reason,
            )
        elif instruction.code == AGENT_EXIT_SUPERSEDED:
            # another process is this instance now: its jobs and files are not ours
            log.warning("%s; exiting, leaving jobs and data dir to it", instruction.reason)
        elif instruction.code == 0:
            log.info("%s", instruction.reason)
        else:
            log.error("%s", instruction.reason)
        if instruction.tombstone or instruction.code == 0:
            # a retiring or stopping agent: its zygote goes too (its runners go on);
            # a superseded one leaves it to the process that is this instance now
            await asyncio.to_thread(self.supervisor.stop_zygote)
        self.exit = instruction

    # -- serving peers -------------------------------------------------------------------------

    async def verify_peer(self, sha256: str, token: str, recipient: str | None) -> str | None:
        """Ask the server whether `token` lets its bearer fetch `sha256` from us for
        `recipient` (the token is used up by a yes)."""
        try:
            resp = await self.server.request(
                "POST",
                "/api/v1/agents/peer/verify",
                json={"sha256": sha256, "token": token, "recipient": recipient},
                headers={"Authorization": f"Bearer {self.me.credential}"},
                deadline=time.monotonic() + 10,
            )
        except Unreachable as exc:
            return f"cannot check the token with a server: {exc}"
        if resp.status_code == 200:
            return None
        try:
            return resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {resp.status_code}"

    async def start_peer(self) -> None:
        self.peer = PeerServer(
            self.objects, self.verify_peer, self.config.peer_host, self.config.peer_port
        )
        host = self.config.peer_host
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        self.peer_url = self.config.peer_url or f"http://{host}:{self.peer.port}"
        self.config.peer_port = self.peer.port  # a re-exec keeps the same address
        asyncio.get_running_loop().create_task(self.peer.serve())

    # -- relaying runners' reports ------------------------------------------------------------

    async def start_relay(self) -> None:
        """Runners hand their attempt reports to this agent, which sends what waits as
        one request (corral.agent.relay). CORRAL_RELAY=0 turns it off: runners then
        report to the server themselves, as they do whenever the relay is not there."""
        if os.environ.get("CORRAL_RELAY", "1") == "0":
            return
        self.relay = RelayServer(self.data_dir, self.relay_reports)
        try:
            await self.relay.start()
        except OSError as exc:
            log.warning("cannot open the runners' relay socket (%s); runners report directly", exc)
            self.relay = None

    async def relay_reports(self, reports: list[dict]) -> list[dict] | None:
        if self.identity is None or time.monotonic() < self.relay_refused_until:
            self.start_reports.relayed(reports)
            return None
        try:
            answers, status = await server_calls.relay_reports(
                self.server, reports, self.identity.credential, SEND_WITHIN
            )
        finally:
            self.start_reports.relayed(reports)
        if status in (404, 405):  # a server from before the relay: runners go direct
            self.relay_refused_until = time.monotonic() + 300
            log.info(
                "the server does not take relayed reports (HTTP %s); runners report directly",
                status,
            )
        return answers

    def _auth_for(self, url: str) -> dict[str, str]:
        """Artifacts a corral server stores need this instance's credential."""
        if any(url.startswith(s.rstrip("/") + "/") for s in self.config.servers):
            return {"Authorization": f"Bearer {self.me.credential}"}
        return {}
