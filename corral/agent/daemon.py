"""The agent daemon: register, then heartbeat forever.

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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

import corral
from corral.agent import tls, transfer
from corral.agent.artifacts import Artifact, ArtifactCache, Installer, InstallError
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
from corral.agent.runner import SELF_TEST_OK as RUNNER_OK
from corral.agent.sandbox import host as sandbox_host
from corral.agent.selfupdate import SELF_TEST_OK as AGENT_OK
from corral.agent.selfupdate import VERSION_ENV, SelfUpdate
from corral.agent.supervisor import Supervisor
from corral.agent.upstream import Unreachable
from corral.agent.upstream_async import AsyncServer
from corral.api import (
    Fetch,
    HeartbeatReply,
    HeartbeatRequest,
    InstallOrder,
    ObjectError,
    ObservedComponent,
    OffloadOrder,
    RegisterReply,
    RegisterRequest,
)
from corral.domain.backoff import Backoff
from corral.domain.instances import AGENT_EXIT_RETIRED, AGENT_EXIT_SUPERSEDED, superseded
from corral.domain.sandbox import DEFAULT_JOB_USER

log = logging.getLogger("corral.agent")

RECONNECT = Backoff(base=0.5, factor=2.0, maximum=10.0, jitter=0.5)
ATTEMPT_TOKEN_HEADER = "X-Corral-Attempt-Token"


def self_test(what: str, expected: str):
    """A verifier: the new build must run `--self-test` and say `expected`."""

    def verify(path: Path) -> None:
        import subprocess

        try:
            r = subprocess.run(
                [str(path), "--self-test"], check=False, capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InstallError(f"the new {what} cannot run: {exc}") from None
        if r.returncode != 0 or expected not in r.stdout:
            raise InstallError(
                f"the new {what} failed its self-test (exit {r.returncode}): "
                f"{(r.stderr or r.stdout).strip()[:300]}"
            )

    return verify


VERIFIERS = {"runner": self_test("runner", RUNNER_OK), "agent": self_test("agent", AGENT_OK)}


def _error_message(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200] or f"HTTP {resp.status_code}"


class AgentExit(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


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
        return [*args, "--switch-timeout", str(self.switch_timeout)]


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.data_dir = config.data_dir
        self.identity: Identity | None = None
        self.incarnation: int | None = None
        self.interval = 2.0
        self.server = AsyncServer(config.servers, timeout=30)
        self.installer = Installer(self.data_dir, ArtifactCache(self.data_dir / "cache"))
        self.objects = ObjectStore(self.data_dir)
        self.peer: PeerServer | None = None
        self.peer_url: str | None = None
        self.fetching: dict[str, asyncio.Task] = {}
        self.fetch_slots = asyncio.Semaphore(4)
        self.object_errors: dict[str, str] = {}
        self.offloading: dict[str, asyncio.Task] = {}
        self.offloaded: set[str] = set()
        self.offload_errors: dict[str, str] = {}
        self._last_objects: tuple[list[str], float] | None = None
        self.supervisor = Supervisor(self.data_dir, config.servers, installer=self.installer)
        self.installing: dict[str, asyncio.Task] = {}
        self.install_errors: dict[str, tuple[str, str]] = {}  # name -> (sha256, error)
        self.wake = asyncio.Event()  # heartbeat again now (an install finished)
        self.selfupdate = SelfUpdate(
            self.data_dir, self.installer, config.argv(), config.switch_timeout
        )
        self.stopping = asyncio.Event()
        self._parent = os.getppid()
        self.sandbox: sandbox_host.Host | None = None

    @property
    def me(self) -> Identity:
        """This instance's identity (registration sets it before anything needs it)."""
        if self.identity is None:
            raise AgentExit(2, "not registered")
        return self.identity

    # -- registration ----------------------------------------------------------------------

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

    async def register(self) -> None:
        """Register (first time, with the join token) or re-register (with the
        instance's credential) until the server answers."""
        failures = 0
        while not self.stopping.is_set():
            ident = self.identity
            secret = ident.credential if ident else self.config.join_token
            if not secret:
                raise AgentExit(2, "no join token and no identity: pass --join-token")
            try:
                resp = await self.server.request(
                    "POST",
                    "/api/v1/agents/register",
                    json=self._register_body(),
                    headers={"Authorization": f"Bearer {secret}"},
                    deadline=time.monotonic() + 30,
                )
            except Unreachable as exc:
                failures += 1
                delay = RECONNECT.delay(failures, random.random())
                log.warning("cannot reach a server (%s); retrying in %.1fs", exc, delay)
                await self._sleep(delay)
                continue
            if resp.status_code == 401 and ident is not None:
                # the credential is revoked (the instance retired, or an operator revoked
                # it) or unknown: never join as a new one
                raise AgentExit(
                    AGENT_EXIT_RETIRED,
                    f"the server refuses this instance's credential: {_error_message(resp)}",
                )
            if resp.status_code >= 400:
                try:  # the server's JSON error says what is wrong and what to do
                    why = str(resp.json()["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    why = resp.text[:500]
                raise AgentExit(2, f"registration refused (HTTP {resp.status_code}): {why}")
            reply = RegisterReply.model_validate(resp.json())
            if reply.action == "exit":
                raise AgentExit(AGENT_EXIT_RETIRED, reply.reason)
            if ident is None:
                if reply.instance_id is None or reply.credential is None:
                    raise AgentExit(2, "the server welcomed this agent without an identity")
                self.identity = Identity(reply.instance_id, reply.credential, self.config.name)
                save_identity(self.data_dir, self.identity)
            self.incarnation = reply.incarnation
            self.interval = reply.interval
            self.supervisor.instance_id = reply.instance_id
            log.info(
                "registered as %s (%s), incarnation %s, state %s",
                self.me.name,
                reply.instance_id,
                reply.incarnation,
                reply.state,
            )
            return

    # -- the heartbeat loop ------------------------------------------------------------------

    def observed_components(self) -> list[ObservedComponent]:
        out = {
            i.name: ObservedComponent(name=i.name, version=i.version, sha256=i.sha256)
            for i in self.installer.all_installed()
        }
        errors = dict(self.install_errors)
        if self.selfupdate.rollback_error:
            errors["agent"] = self.selfupdate.rollback_error
        for name, (sha, error) in errors.items():
            o = out.get(name) or ObservedComponent(name=name)
            out[name] = o.model_copy(update={"error": error[:4000], "error_sha256": sha})
        return list(out.values())

    def observed_objects(self) -> list[str] | None:
        """The objects held, when that changed (or every 30 s); else None."""
        held = self.objects.list()
        last = self._last_objects
        if last is not None and last[0] == held and time.monotonic() - last[1] < 30:
            return None
        return held

    async def heartbeat(self) -> HeartbeatReply | None:
        held = self.observed_objects()
        errors = [ObjectError(sha256=s, error=e[:4000]) for s, e in self.object_errors.items()]
        offloaded = sorted(self.offloaded)
        offload_errors = [
            ObjectError(sha256=s, error=e[:4000]) for s, e in self.offload_errors.items()
        ]
        body = HeartbeatRequest(
            instance_id=self.me.instance_id,
            incarnation=self.incarnation or 0,
            attempts=self.supervisor.observed(),
            components=self.observed_components(),
            objects=held,
            object_errors=errors,
            offloaded=offloaded,
            offload_errors=offload_errors,
            wait=0.0 if self.wake.is_set() else self.interval,
        ).model_dump()
        self.wake.clear()
        resp = await self.server.request(
            "POST",
            "/api/v1/agents/heartbeat",
            json=body,
            timeout=self.interval + 30,
            headers={"Authorization": f"Bearer {self.me.credential}"},
            deadline=time.monotonic() + self.interval,
        )
        if resp.status_code == 401:
            return None  # credential unknown: re-register decides what that means
        if resp.status_code >= 400:
            raise Unreachable(f"heartbeat: HTTP {resp.status_code} {resp.text[:200]}")
        if held is not None:
            self._last_objects = (held, time.monotonic())
        for e in errors:
            self.object_errors.pop(e.sha256, None)
        self.offloaded.difference_update(offloaded)
        for e in offload_errors:
            self.offload_errors.pop(e.sha256, None)
        return HeartbeatReply.model_validate(resp.json())

    async def report_ended(self) -> None:
        ended_now = self.supervisor.reap()
        if ended_now:
            # their outputs are in the store now: report them (only this report makes
            # a replica the server trusts)
            self._last_objects = None
        for ended in ended_now:
            if ended.report_lost:
                try:
                    resp = await self.server.request(
                        "POST",
                        f"/api/v1/jobs/{ended.job_id}/attempts/{ended.attempt}/lost",
                        json={"reason": ended.reason},
                        headers={ATTEMPT_TOKEN_HEADER: ended.token},
                        deadline=time.monotonic() + 5,
                    )
                except Unreachable:
                    continue  # keep it; report on the next round
                log.warning(
                    "attempt %s/%s lost (%s): HTTP %s",
                    ended.job_id,
                    ended.attempt,
                    ended.reason,
                    resp.status_code,
                )
            self.supervisor.forget(ended.job_id, ended.attempt)

    async def apply(self, reply: HeartbeatReply) -> None:
        for k in reply.kill:
            await asyncio.to_thread(self.supervisor.kill, k.job_id, k.attempt, k.reason)
        for s in reply.start:
            try:
                self.supervisor.start(s)
            except OSError as exc:  # e.g. a full disk: that attempt cannot run here
                log.warning("cannot start attempt %s/%s: %s", s.job_id, s.attempt, exc)
                try:
                    await self.server.request(
                        "POST",
                        f"/api/v1/jobs/{s.job_id}/attempts/{s.attempt}/lost",
                        json={"reason": f"the agent cannot start it: {exc}"[:4000]},
                        headers={ATTEMPT_TOKEN_HEADER: s.token},
                        deadline=time.monotonic() + 5,
                    )
                except Unreachable:
                    pass
        for order in reply.install:
            task = self.installing.get(order.component)
            if task is None or task.done():
                self.installing[order.component] = asyncio.get_running_loop().create_task(
                    self._install(order)
                )
        for fetch in reply.replicate:
            task = self.fetching.get(fetch.sha256)
            if task is None or task.done():
                self.fetching[fetch.sha256] = asyncio.get_running_loop().create_task(
                    self._replicate(fetch)
                )

        for offload in reply.offload:
            task = self.offloading.get(offload.sha256)
            if task is None or task.done():
                self.offloading[offload.sha256] = asyncio.get_running_loop().create_task(
                    self._offload(offload)
                )

    async def _offload(self, order: OffloadOrder) -> None:
        """Upload an object to the durable store, as ordered; the server checks the
        bucket itself before it counts the copy."""
        async with self.fetch_slots:
            try:
                await asyncio.to_thread(
                    transfer.upload,
                    self.objects,
                    order.sha256,
                    order.size,
                    order.url,
                    order.headers,
                )
                self.offloaded.add(order.sha256)
                log.info("uploaded object %s to the durable store", order.sha256[:12])
            except (transfer.TransferError, OSError) as exc:
                self.offload_errors[order.sha256] = str(exc)
                log.warning("upload of %s to the durable store failed: %s", order.sha256[:12], exc)
        self.wake.set()

    async def _replicate(self, order: Fetch) -> None:
        """Copy an object from a peer, as ordered (the server only orders running
        instances, and the source checks that with the server again)."""
        async with self.fetch_slots:
            try:
                await asyncio.to_thread(
                    transfer.fetch,
                    self.objects,
                    order.sha256,
                    order.size,
                    order.sources,
                    order.token,
                    recipient=self.me.instance_id,
                )
                log.info("replicated object %s", order.sha256[:12])
            except (transfer.TransferError, OSError) as exc:
                self.object_errors[order.sha256] = str(exc)
                log.warning("replication of %s failed: %s", order.sha256[:12], exc)
        self.wake.set()

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

    def _auth_for(self, url: str) -> dict[str, str]:
        """Artifacts a corral server stores need this instance's credential."""
        if any(url.startswith(s.rstrip("/") + "/") for s in self.config.servers):
            return {"Authorization": f"Bearer {self.me.credential}"}
        return {}

    async def _install(self, order: InstallOrder) -> None:
        art = Artifact(order.component, order.version, order.url, order.sha256, order.size)

        def work() -> None:
            with httpx.Client(
                timeout=httpx.Timeout(30, read=120), follow_redirects=True, verify=tls.context()
            ) as c:
                self.installer.install(
                    art, c, self._auth_for(order.url), verify=VERIFIERS.get(order.component)
                )

        try:
            await asyncio.to_thread(work)
            self.install_errors.pop(order.component, None)
            log.info("%s %s installed", order.component, order.version)
            if order.component == "agent":
                self.selfupdate.switch_if_needed()  # re-executes; does not return
        except (InstallError, OSError) as exc:
            self.install_errors[order.component] = (order.sha256, str(exc))
            log.warning(
                "install of %s %s failed (order %d): %s",
                order.component,
                order.version,
                order.order,
                exc,
            )
        self.wake.set()

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
            )
        except (sandbox_host.SandboxError, OSError) as exc:
            log.error("cannot set up the attempt sandbox: %s", exc)
            return 2
        self.supervisor.host = self.sandbox
        log.info("attempt sandbox: %s", self.sandbox.description)
        for warning in self.sandbox.warnings:
            log.warning("attempt sandbox: %s", warning)
        self.identity = load_identity(self.data_dir)
        await self.start_peer()
        self.supervisor.adopt()
        watchdog = asyncio.get_running_loop().create_task(self._watch_parent())
        try:
            await self.register()
            failures = 0
            while not self.stopping.is_set():
                self.selfupdate.check_deadline()
                await self.report_ended()
                started = time.monotonic()
                try:
                    reply = await self.heartbeat()
                except Unreachable as exc:
                    failures += 1
                    delay = RECONNECT.delay(failures, random.random())
                    log.warning(
                        "heartbeat failed (%s); jobs keep running; retry in %.1fs", exc, delay
                    )
                    await self._sleep(delay)
                    continue
                failures = 0
                if reply is None:
                    await self.register()
                    continue
                if reply.action == "exit":
                    code = AGENT_EXIT_SUPERSEDED if superseded(reply.reason) else AGENT_EXIT_RETIRED
                    raise AgentExit(code, reply.reason)
                self.selfupdate.heartbeat_ok()
                if self.selfupdate.rollback_error:
                    self.selfupdate.error_reported()
                self.interval = reply.interval
                await self.apply(reply)
                if not (reply.start or reply.kill):
                    # the server holds idle heartbeats; never spin if it did not
                    await self._sleep(max(0.0, 0.5 - (time.monotonic() - started)))
            return 0
        except AgentExit as exc:
            if exc.code == AGENT_EXIT_RETIRED:
                log.warning("told to exit: %s; writing tombstone", exc.reason)
                await asyncio.to_thread(self._kill_all, f"agent exiting: {exc.reason}")
                write_tombstone(
                    self.data_dir, self.identity.instance_id if self.identity else None, exc.reason
                )
            elif exc.code == AGENT_EXIT_SUPERSEDED:
                # another process is this instance now: its jobs and files are not ours
                log.warning("%s; exiting, leaving jobs and data dir to it", exc.reason)
            else:
                log.error("%s", exc.reason)
            return exc.code
        finally:
            watchdog.cancel()
            if self.stopping.is_set():
                await self._shutdown()
            if self.sandbox is not None:
                self.sandbox.close()  # empty parent groups and jobs dir only
            if self.peer is not None:
                self.peer.stop()
            await self.server.close()

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _watch_parent(self) -> None:
        if not self.config.exit_with_parent:
            return
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != self._parent:
                log.warning("parent process %d is gone; stopping", self._parent)
                self.stop()
                return

    def _kill_all(self, reason: str) -> list:
        tracked = list(self.supervisor.tracked.values())
        for t in tracked:
            self.supervisor.kill(t.job_id, t.attempt, reason)
        self.supervisor.stop_zygote()
        return tracked

    async def _shutdown(self) -> None:
        """A stopping agent kills its runners and tells the server their attempts are
        lost, so the jobs are requeued at once rather than after the grace period."""
        tracked = await asyncio.to_thread(self._kill_all, "agent stopped")
        for t in tracked:
            try:
                await self.server.request(
                    "POST",
                    f"/api/v1/jobs/{t.job_id}/attempts/{t.attempt}/lost",
                    json={"reason": "agent stopped"},
                    headers={ATTEMPT_TOKEN_HEADER: t.token},
                    deadline=time.monotonic() + 2,
                )
            except Unreachable:
                pass
