"""The agent's decisions as a pure state machine, in the manner of dask's `WorkerState`.

`AgentState.handle(event, now)` takes one thing that happened (a heartbeat reply, a
runner that exited, a transfer or an install that finished, a timer tick, an order to
stop or retire) and returns the instructions the I/O shell must carry out (register,
send a heartbeat, start or kill an attempt, report one lost, fetch or upload an
object, install a component, exit). It does no I/O, reads no clock (time is passed
in), draws no random numbers (jitter is passed in) and knows nothing of asyncio: the
real daemon and the simulator both drive it, so the simulator checks the agent's own
decisions under faults, not a model of them.

What it guarantees (`validate()` checks these after every event in the tests):
- never two live attempts of one job: a start order for a job whose older attempt
  still runs here waits until that attempt is gone (and the older one is killed: the
  newer order proves its token was revoked); an older or repeated order is ignored;
- an attempt is killed only with its own fencing token, and only if it is tracked;
- a component is never installed over the same sha256 it already has, and at most one
  install per component is under way (a repeated order while one runs is dropped);
- a retiring (or superseded, or stopping) agent starts, fetches and installs nothing;
- one heartbeat or registration in flight at a time, and one lease renewal (only by a
  registered, running agent); an object is fetched at most once at a time, and never
  when it is already held;
- a copy is reported (at once, outside the heartbeat) only once it is held, and
  never by an agent that left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from corral.api import (
    Fetch,
    HeartbeatReply,
    InstallOrder,
    ObjectError,
    ObservedAttempt,
    ObservedComponent,
    OffloadOrder,
    StartOrder,
)
from corral.domain.backoff import Backoff
from corral.domain.heartbeat import objects_refresh
from corral.domain.instances import AGENT_EXIT_RETIRED, AGENT_EXIT_SUPERSEDED, superseded

RECONNECT = Backoff(base=0.5, factor=2.0, maximum=10.0, jitter=0.5)
IDLE_GAP = 0.5  # never heartbeat more often than this when the server sent nothing
EXIT_SUPERSEDED = AGENT_EXIT_SUPERSEDED  # another agent process took over this instance

# ---- events (what happened) ----------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed; timers that are due fire."""


@dataclass(frozen=True)
class Registered:
    instance_id: str
    incarnation: int
    interval: float
    credential: str | None = None  # sent on first registration only
    lease_interval: float | None = None  # renew this often from now on (None: exchanges do)


@dataclass(frozen=True)
class RegisterFailed:
    """The server could not be reached; `rand` in [0, 1) picks the backoff jitter."""

    error: str
    rand: float = 0.5


@dataclass(frozen=True)
class HeartbeatReplied:
    reply: HeartbeatReply
    seq: int | None = None  # the SendHeartbeat.seq it answers (None: the one in flight)


@dataclass(frozen=True)
class HeartbeatFailed:
    error: str
    rand: float = 0.5


@dataclass(frozen=True)
class LeaseAnswered:
    """A lease renewal came back: renewed, or the server wants a full exchange first
    (`exchange`), or it did not get through (neither: the next one is due as usual)."""

    renewed: bool
    exchange: bool = False


@dataclass(frozen=True)
class HeartbeatRejected:
    """HTTP 401: the credential is unknown; registering again decides what that means."""


@dataclass(frozen=True)
class Retire:
    """The server said exit (or no longer knows this instance): never run again."""

    reason: str


@dataclass(frozen=True)
class Superseded:
    """Another agent process holds this data dir now: leave its runners alone."""

    reason: str


@dataclass(frozen=True)
class Fatal:
    """The agent cannot go on (its registration was refused, it has no join token):
    exit with `code`, leaving its runners and its data dir as they are."""

    code: int
    reason: str


@dataclass(frozen=True)
class RolledBack:
    """A new agent build was rolled back (found at start): tell the server once."""

    sha256: str
    error: str


@dataclass(frozen=True)
class Stop:
    """The operator stops the agent: kill the runners, report them lost, exit."""

    reason: str = "agent stopped"


@dataclass(frozen=True)
class AttemptStarted:
    job_id: int
    attempt: int


@dataclass(frozen=True)
class StartFailed:
    job_id: int
    attempt: int
    error: str


@dataclass(frozen=True)
class RunnerExited:
    """A runner is gone. `report_lost` when it ended without telling the server;
    `outputs` are the objects it left in the store."""

    job_id: int
    attempt: int
    report_lost: bool = False
    reason: str = ""
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stored:
    """Objects landed in the local store (a runner's outputs, before it reports them)."""

    sha256s: tuple[str, ...]


@dataclass(frozen=True)
class LostReported:
    job_id: int
    attempt: int
    delivered: bool  # False: the server was unreachable; report again later


@dataclass(frozen=True)
class TransferDone:
    sha256: str


@dataclass(frozen=True)
class TransferFailed:
    sha256: str
    error: str


@dataclass(frozen=True)
class OffloadDone:
    sha256: str


@dataclass(frozen=True)
class OffloadFailed:
    sha256: str
    error: str


@dataclass(frozen=True)
class InstallDone:
    component: str
    version: str
    sha256: str  # what was verified and is on disk now


@dataclass(frozen=True)
class InstallFailed:
    component: str
    sha256: str  # the target that did not land
    error: str


Event = (
    Tick
    | Registered
    | RegisterFailed
    | HeartbeatReplied
    | HeartbeatFailed
    | HeartbeatRejected
    | LeaseAnswered
    | Retire
    | Superseded
    | Fatal
    | RolledBack
    | Stop
    | AttemptStarted
    | StartFailed
    | RunnerExited
    | LostReported
    | Stored
    | TransferDone
    | TransferFailed
    | OffloadDone
    | OffloadFailed
    | InstallDone
    | InstallFailed
)

# ---- instructions (what to do) ------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    instance_id: str | None  # None: first registration, with the join token


@dataclass(frozen=True)
class SendHeartbeat:
    instance_id: str
    incarnation: int
    attempts: tuple[ObservedAttempt, ...]
    components: tuple[ObservedComponent, ...]
    objects: tuple[str, ...] | None  # None: unchanged since the last one the server got
    object_errors: tuple[ObjectError, ...]
    offloaded: tuple[str, ...]
    offload_errors: tuple[ObjectError, ...]
    wait: float
    seq: int = 0  # numbers this heartbeat; its reply carries it back
    renews_every: float | None = None  # the lease interval it renews at between exchanges


@dataclass(frozen=True)
class RenewLease:
    """Renew the lease between exchanges (a tiny request: POST /api/v1/agents/lease)."""

    instance_id: str
    incarnation: int
    within: float  # give up after this long: the next renewal is due then


@dataclass(frozen=True)
class StartAttempt:
    order: StartOrder


@dataclass(frozen=True)
class KillAttempt:
    job_id: int
    attempt: int
    token: str
    reason: str


@dataclass(frozen=True)
class ReportLost:
    job_id: int
    attempt: int
    token: str
    reason: str


@dataclass(frozen=True)
class FetchObject:
    order: Fetch


@dataclass(frozen=True)
class ReportCopies:
    """Tell the server at once that ordered copies landed here (verified by hash), so a
    drain waiting on them need not wait for the next heartbeat (held by the server up
    to the interval). Best effort: the heartbeat's object list reports them too."""

    instance_id: str
    incarnation: int
    sha256s: tuple[str, ...]


@dataclass(frozen=True)
class OffloadObject:
    order: OffloadOrder


@dataclass(frozen=True)
class Install:
    order: InstallOrder


@dataclass(frozen=True)
class Exit:
    code: int
    reason: str
    tombstone: bool  # retired: write the tombstone so no supervisor brings it back


Instruction = (
    Register
    | SendHeartbeat
    | RenewLease
    | StartAttempt
    | KillAttempt
    | ReportLost
    | FetchObject
    | ReportCopies
    | OffloadObject
    | Install
    | Exit
)

# ---- the state ------------------------------------------------------------------------------


class Phase(StrEnum):
    UNREGISTERED = "unregistered"
    RUNNING = "running"
    EXITED = "exited"  # retired, superseded or stopped: nothing new ever starts


class AttemptPhase(StrEnum):
    STARTING = "starting"  # StartAttempt issued
    RUNNING = "running"
    KILLING = "killing"  # KillAttempt issued, the runner is not gone yet
    LOST = "lost"  # gone without telling the server; ReportLost pending


@dataclass
class Attempt:
    job_id: int
    attempt: int
    token: str
    phase: AttemptPhase

    @property
    def live(self) -> bool:
        return self.phase is not AttemptPhase.LOST


@dataclass
class AgentState:
    """Everything the agent decides on. Mutated only by `handle`."""

    instance_id: str | None = None
    incarnation: int = 0
    interval: float = 2.0
    phase: Phase = Phase.UNREGISTERED
    exit_code: int | None = None
    attempts: dict[tuple[int, int], Attempt] = field(default_factory=dict)
    waiting: dict[int, StartOrder] = field(default_factory=dict)  # job -> start held back
    installed: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (ver, sha)
    installing: dict[str, str] = field(default_factory=dict)  # name -> target sha256
    install_errors: dict[str, tuple[str, str]] = field(default_factory=dict)  # (sha, error)
    held: set[str] = field(default_factory=set)
    fetching: set[str] = field(default_factory=set)
    reporting: set[tuple[int, int]] = field(default_factory=set)  # ReportLost in flight
    object_errors: dict[str, str] = field(default_factory=dict)
    offloading: set[str] = field(default_factory=set)
    offloaded: set[str] = field(default_factory=set)
    offload_errors: dict[str, str] = field(default_factory=dict)
    rollback: tuple[str, str] | None = None  # (sha256, why) of a rolled-back agent build
    in_flight: SendHeartbeat | Register | None = None
    sent_at: float = 0.0  # when the heartbeat in flight went out
    next_contact_at: float = 0.0
    failures: int = 0
    sent_count: int = 0  # heartbeats sent: numbers them so a stray reply is not taken
    wake: bool = False  # something finished: heartbeat again now
    lease_interval: float | None = None  # renew the lease this often between exchanges
    renewed_at: float = 0.0  # when the last renewal (an exchange or a lease request) went out
    renewing: bool = False  # a lease renewal request in flight
    objects_sent: tuple[tuple[str, ...], float] | None = None
    # validate() checks the instructions of the last event against the state they left
    last: list[Instruction] = field(default_factory=list)

    def adopt(self, job_id: int, attempt: int, token: str) -> None:
        """A runner an earlier incarnation of this agent started (found on disk)."""
        self.attempts[(job_id, attempt)] = Attempt(job_id, attempt, token, AttemptPhase.RUNNING)

    # ---- dispatch ----------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Instruction]:
        out: list[Instruction] = []
        match event:
            case Tick():
                out += [
                    ReportLost(a.job_id, a.attempt, a.token, "runner ended unreported")
                    for a in self._unreported()
                ]
            case Registered():
                self._registered(event, now)
            case RegisterFailed() | HeartbeatFailed():
                expected = Register if isinstance(event, RegisterFailed) else SendHeartbeat
                if isinstance(self.in_flight, expected):
                    self.in_flight = None
                    self.failures += 1
                    self.next_contact_at = now + RECONNECT.delay(self.failures, event.rand)
            case HeartbeatReplied():
                if event.seq is None or (
                    isinstance(self.in_flight, SendHeartbeat) and event.seq == self.in_flight.seq
                ):
                    out += self._replied(event.reply, now)
            case LeaseAnswered():
                self.renewing = False
                if event.exchange and self.phase is Phase.RUNNING:
                    self.wake = True  # the server has news, or must admit us again
            case HeartbeatRejected():
                if isinstance(self.in_flight, SendHeartbeat):
                    self.in_flight = None
                    self.phase = Phase.UNREGISTERED
                    self.next_contact_at = now
            case Retire():
                out += self._leave(AGENT_EXIT_RETIRED, event.reason, tombstone=True, kill=True)
            case Superseded():
                out += self._leave(EXIT_SUPERSEDED, event.reason, tombstone=False, kill=False)
            case Fatal():
                out += self._leave(event.code, event.reason, tombstone=False, kill=False)
            case RolledBack():
                self.rollback = (event.sha256, event.error)
            case Stop():
                out += self._leave(0, event.reason, tombstone=False, kill=True, report=True)
            case AttemptStarted():
                a = self.attempts.get((event.job_id, event.attempt))
                if a is not None and a.phase is AttemptPhase.STARTING:
                    a.phase = AttemptPhase.RUNNING
            case StartFailed():
                out += self._gone(event.job_id, event.attempt, True, event.error, now)
            case RunnerExited():
                self.held.update(event.outputs)
                if (event.job_id, event.attempt) in self.attempts:
                    # its outputs are in the store now: the next heartbeat carries the
                    # full list (only this report makes a replica the server trusts)
                    self.objects_sent = None
                out += self._gone(event.job_id, event.attempt, event.report_lost, event.reason, now)
            case LostReported():
                key = (event.job_id, event.attempt)
                a = self.attempts.get(key)
                self.reporting.discard(key)
                if a is not None and a.phase is AttemptPhase.LOST and event.delivered:
                    del self.attempts[key]
                    out += self._release(event.job_id)
            case Stored():
                if not self.held.issuperset(event.sha256s):
                    self.held.update(event.sha256s)
                    self.wake = True
            case TransferDone():
                fetched = event.sha256 in self.fetching
                self.fetching.discard(event.sha256)
                self.held.add(event.sha256)
                self.object_errors.pop(event.sha256, None)
                if fetched and self.phase is Phase.RUNNING and self.instance_id is not None:
                    # reported at once on its own; the next heartbeat lists it too (not
                    # one woken per copy: a drain lands many, each a full exchange)
                    out.append(ReportCopies(self.instance_id, self.incarnation, (event.sha256,)))
                else:
                    self.wake = True
            case TransferFailed():
                self.fetching.discard(event.sha256)
                if event.sha256 not in self.held:
                    self.object_errors[event.sha256] = event.error
                self.wake = True
            case OffloadDone():
                self.offloading.discard(event.sha256)
                self.offloaded.add(event.sha256)
                self.wake = True
            case OffloadFailed():
                self.offloading.discard(event.sha256)
                self.offload_errors[event.sha256] = event.error
                self.wake = True
            case InstallDone():
                if self.installing.get(event.component) == event.sha256:
                    del self.installing[event.component]
                self.installed[event.component] = (event.version, event.sha256)
                self.install_errors.pop(event.component, None)
                self.wake = True
            case InstallFailed():
                if self.installing.get(event.component) == event.sha256:
                    del self.installing[event.component]
                self.install_errors[event.component] = (event.sha256, event.error)
                self.wake = True
        out += self._contact(now)
        self.last = out
        return out

    # ---- registration and heartbeats -------------------------------------------------------

    def _registered(self, ev: Registered, now: float) -> None:
        if self.phase is not Phase.UNREGISTERED or not isinstance(self.in_flight, Register):
            return  # a late or repeated welcome changes nothing
        if self.instance_id is not None and ev.instance_id != self.instance_id:
            return  # never become another instance
        self.instance_id = ev.instance_id
        self.incarnation = ev.incarnation
        self.interval = ev.interval
        # renewals from the registration on, when told (an exchange may say otherwise)
        self.lease_interval = ev.lease_interval
        self.renewing = False
        self.renewed_at = now
        self.wake = True  # the first exchange is not held: it says how to renew the lease
        self.phase = Phase.RUNNING
        self.in_flight = None
        self.failures = 0
        self.objects_sent = None
        self.next_contact_at = now

    def _contact(self, now: float) -> list[Instruction]:
        return self._exchange(now) + self._renew(now)

    def _exchange(self, now: float) -> list[Instruction]:
        """Register or heartbeat when due and nothing is in flight."""
        if self.in_flight is not None or self.phase is Phase.EXITED:
            return []
        if now < self.next_contact_at and not (self.wake and self.phase is Phase.RUNNING):
            return []
        if self.phase is Phase.UNREGISTERED:
            self.in_flight = Register(self.instance_id)
            return [self.in_flight]
        self.sent_count += 1
        self.sent_at = now
        self.renewed_at = now  # every exchange renews the lease
        self.in_flight = self.observed(now)
        self.wake = False
        return [self.in_flight]

    def lease_due(self) -> float | None:
        """When the next lease renewal between exchanges is due (None: none is)."""
        if self.phase is not Phase.RUNNING or self.lease_interval is None or self.renewing:
            return None
        return self.renewed_at + self.lease_interval

    def _renew(self, now: float) -> list[Instruction]:
        """Renew the lease when its interval has passed since the last renewal (a
        held exchange renewed it only when it went out)."""
        due = self.lease_due()
        if due is None or now < due or self.instance_id is None:
            return []
        self.renewing = True
        self.renewed_at = now
        return [RenewLease(self.instance_id, self.incarnation, self.lease_interval or 0.0)]

    def observed(self, now: float) -> SendHeartbeat:
        if self.instance_id is None:
            raise RuntimeError("no heartbeat before registration")
        comps = {
            name: ObservedComponent(name=name, version=v, sha256=s)
            for name, (v, s) in sorted(self.installed.items())
        }
        errors = dict(self.install_errors)
        if self.rollback is not None:
            errors["agent"] = self.rollback
        for name, (sha, error) in sorted(errors.items()):
            o = comps.get(name) or ObservedComponent(name=name)
            comps[name] = o.model_copy(update={"error": error[:4000], "error_sha256": sha})
        held = tuple(sorted(self.held))
        sent = self.objects_sent
        # the full list goes up at least every objects_refresh (stretched with the
        # exchange interval: a list forces a full exchange)
        fresh = sent and sent[0] == held and now - sent[1] < objects_refresh(self.interval)
        objects = None if fresh else held
        return SendHeartbeat(
            instance_id=self.instance_id,
            incarnation=self.incarnation,
            attempts=tuple(
                ObservedAttempt(job_id=a.job_id, attempt=a.attempt, token=a.token)
                for a in sorted(self.attempts.values(), key=lambda a: (a.job_id, a.attempt))
                if a.phase is not AttemptPhase.LOST
            ),
            components=tuple(comps.values()),
            objects=objects,
            object_errors=tuple(
                ObjectError(sha256=s, error=e[:4000]) for s, e in sorted(self.object_errors.items())
            ),
            offloaded=tuple(sorted(self.offloaded)),
            offload_errors=tuple(
                ObjectError(sha256=s, error=e[:4000])
                for s, e in sorted(self.offload_errors.items())
            ),
            wait=0.0 if self.wake else self.interval,
            seq=self.sent_count,
            renews_every=self.lease_interval,
        )

    def _replied(self, reply: HeartbeatReply, now: float) -> list[Instruction]:
        sent = self.in_flight
        if self.phase is not Phase.RUNNING or not isinstance(sent, SendHeartbeat):
            return []  # a duplicate or late reply: its orders were (or will be) sent again
        self.in_flight = None
        self.failures = 0
        if reply.action == "exit":
            if superseded(reply.reason):  # a newer process of this instance: its jobs now
                return self._leave(EXIT_SUPERSEDED, reply.reason, tombstone=False, kill=False)
            return self._leave(AGENT_EXIT_RETIRED, reply.reason, tombstone=True, kill=True)
        # what the server has now got is no longer news
        if self.rollback is not None and any(
            c.name == "agent" and c.error_sha256 == self.rollback[0] for c in sent.components
        ):
            self.rollback = None
        if sent.objects is not None:
            self.objects_sent = (sent.objects, now)
        for e in sent.object_errors:
            if self.object_errors.get(e.sha256, "")[:4000] == e.error:
                del self.object_errors[e.sha256]
        self.offloaded.difference_update(sent.offloaded)
        for e in sent.offload_errors:
            self.offload_errors.pop(e.sha256, None)
        self.interval = reply.interval
        self.lease_interval = reply.lease_interval
        out: list[Instruction] = []
        for k in reply.kill:
            out += self._kill(k.job_id, k.attempt, k.reason)
        for s in reply.start:
            out += self._start(s)
        for order in reply.install:
            out += self._install(order)
        for f in reply.replicate:
            if f.sha256 not in self.held and f.sha256 not in self.fetching:
                self.fetching.add(f.sha256)
                out.append(FetchObject(f))
        for o in reply.offload:
            if o.sha256 in self.offloading:
                continue
            if o.sha256 in self.held:
                self.offloading.add(o.sha256)
                out.append(OffloadObject(o))
            else:  # never dropped in silence: the server waits on every order it gave
                self.offload_errors[o.sha256] = "not held by this instance"
                self.wake = True
        # the server holds idle heartbeats; never spin if it did not. An exchange sent
        # not to be held (it carried news) is followed by a held one at once: a gap
        # here is a window in which an order for this instance waits for no one
        idle = self.sent_at + IDLE_GAP if sent.wait > 0 else now
        self.next_contact_at = now if (reply.start or reply.kill) else max(now, idle)
        return out

    # ---- attempts ----------------------------------------------------------------------------

    def _live_of(self, job_id: int) -> list[Attempt]:
        return [a for a in self.attempts.values() if a.job_id == job_id and a.live]

    def _kill(self, job_id: int, attempt: int, reason: str) -> list[Instruction]:
        a = self.attempts.get((job_id, attempt))
        if a is None or a.phase in (AttemptPhase.KILLING, AttemptPhase.LOST):
            w = self.waiting.get(job_id)
            if w is not None and w.attempt == attempt:
                del self.waiting[job_id]  # revoked before it could start
            return []
        a.phase = AttemptPhase.KILLING
        kill = KillAttempt(job_id, attempt, a.token, reason)
        return [kill]

    def _start(self, order: StartOrder) -> list[Instruction]:
        if self.phase is not Phase.RUNNING:
            return []
        key = (order.job_id, order.attempt)
        if key in self.attempts:
            return []  # a repeated order: it already runs (or ran) here
        live = self._live_of(order.job_id)
        if any(a.attempt >= order.attempt for a in live):
            return []  # an older order arriving late: the newer attempt wins
        w = self.waiting.get(order.job_id)
        if w is not None and w.attempt >= order.attempt:
            return []
        if live or any(a.job_id == order.job_id for a in self.attempts.values()):
            # the newer order proves the older token was revoked: kill it, start after
            self.waiting[order.job_id] = order
            out: list[Instruction] = []
            for a in live:
                out += self._kill(a.job_id, a.attempt, f"superseded by attempt {order.attempt}")
            return out
        self.attempts[key] = Attempt(*key, order.token, AttemptPhase.STARTING)
        return [StartAttempt(order)]

    def _gone(
        self, job_id: int, attempt: int, report_lost: bool, reason: str, now: float
    ) -> list[Instruction]:
        a = self.attempts.get((job_id, attempt))
        if a is None or a.phase is AttemptPhase.LOST:
            return []
        self.wake = True
        if self.phase is Phase.EXITED:  # leaving already killed or reported it
            del self.attempts[(job_id, attempt)]
            return []
        if report_lost and a.phase is not AttemptPhase.KILLING:
            a.phase = AttemptPhase.LOST
            self.reporting.add((job_id, attempt))
            return [ReportLost(job_id, attempt, a.token, reason)]
        del self.attempts[(job_id, attempt)]
        return self._release(job_id)

    def _unreported(self) -> list[Attempt]:
        """Attempts that ended unreported whose last report did not reach a server."""
        if self.phase is Phase.EXITED:
            return []
        found = [
            a
            for key, a in sorted(self.attempts.items())
            if a.phase is AttemptPhase.LOST and key not in self.reporting
        ]
        self.reporting.update((a.job_id, a.attempt) for a in found)
        return found

    def _release(self, job_id: int) -> list[Instruction]:
        """The job's older attempt is gone: a start held back for it may go now."""
        order = self.waiting.get(job_id)
        if order is None or any(a.job_id == job_id for a in self.attempts.values()):
            return []
        del self.waiting[job_id]
        return self._start(order)

    # ---- components --------------------------------------------------------------------------

    def _install(self, order: InstallOrder) -> list[Instruction]:
        if self.phase is not Phase.RUNNING:
            return []
        have = self.installed.get(order.component)
        if have is not None and have[1] == order.sha256:
            self.install_errors.pop(order.component, None)
            self.wake = True  # tell the server it is there already
            return []
        if order.component in self.installing:
            return []  # one install per component at a time
        self.installing[order.component] = order.sha256
        return [Install(order)]

    # ---- leaving -----------------------------------------------------------------------------

    def _leave(
        self, code: int, reason: str, *, tombstone: bool, kill: bool, report: bool = False
    ) -> list[Instruction]:
        if self.phase is Phase.EXITED:
            return []
        self.phase = Phase.EXITED
        self.exit_code = code
        self.in_flight = None
        self.waiting.clear()
        out: list[Instruction] = []
        if kill:
            for a in sorted(self.attempts.values(), key=lambda a: (a.job_id, a.attempt)):
                if a.phase in (AttemptPhase.STARTING, AttemptPhase.RUNNING):
                    out += self._kill(a.job_id, a.attempt, f"agent exiting: {reason}")
                    if report:
                        out.append(ReportLost(a.job_id, a.attempt, a.token, reason))
        out.append(Exit(code, reason, tombstone))
        return out

    # ---- self-checks -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        live: dict[int, int] = {}
        for (job, n), a in self.attempts.items():
            _require((a.job_id, a.attempt) == (job, n), f"attempt {job}/{n} filed wrongly")
            if a.phase in (AttemptPhase.STARTING, AttemptPhase.RUNNING):
                _require(job not in live, f"job {job} has two live attempts ({n} and another)")
                live[job] = n
        for job, order in self.waiting.items():
            _require(order.job_id == job, f"start of job {order.job_id} filed under {job}")
            _require(self.phase is not Phase.EXITED, "a start is held back by an agent that left")
        starts = [i for i in self.last if isinstance(i, StartAttempt)]
        started = {(i.order.job_id, i.order.attempt) for i in starts}
        _require(len(started) == len(starts), "one attempt started twice by one event")
        for i in self.last:
            if isinstance(i, KillAttempt):
                killed = self.attempts.get((i.job_id, i.attempt))
                _require(
                    killed is not None and killed.token == i.token,
                    f"kill of {i.job_id}/{i.attempt} without its tracked fencing token",
                )
            if isinstance(i, Install):
                have = self.installed.get(i.order.component)
                _require(
                    have is None or have[1] != i.order.sha256,
                    f"install of {i.order.component} over the same sha256",
                )
            if isinstance(i, FetchObject):
                _require(i.order.sha256 not in self.held, "fetch of an object already held")
            if isinstance(i, ReportCopies):
                _require(self.held.issuperset(i.sha256s), "a copy reported that is not held")
        if self.phase is Phase.EXITED:
            bad = [
                i
                for i in self.last
                if isinstance(i, StartAttempt | Install | FetchObject | ReportCopies)
            ]
            _require(not bad, f"an agent that left was told to {bad[:1]!r}")
            _require(
                not any(isinstance(i, SendHeartbeat | Register) for i in self.last),
                "an agent that left still talks to the server",
            )
        for name, sha in self.installing.items():
            have = self.installed.get(name)
            _require(have is None or have[1] != sha, f"installing {name} over the same sha256")
        in_flight = [i for i in self.last if isinstance(i, SendHeartbeat | Register)]
        _require(len(in_flight) <= 1, "two heartbeats or registrations at once")
        renewals = [i for i in self.last if isinstance(i, RenewLease)]
        _require(len(renewals) <= 1, "two lease renewals at once")
        _require(
            not renewals or self.phase is Phase.RUNNING,
            f"a lease renewal by an agent that is {self.phase}",
        )


def _require(ok: bool, broken: str) -> None:
    if not ok:
        raise AssertionError(broken)
