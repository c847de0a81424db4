"""Runner supervision: start, watch, kill and reap one runner process per attempt.

Runners come from the agent's zygote (corral.agent.zygote: a long-lived process
with the runner's code loaded that forks one runner per attempt in about a
millisecond); when the zygote is gone or refuses, a runner is spawned as a fresh
process instead, with a warning, and a new zygote is started for the next ones.

Everything needed to find a runner again lives in its attempt directory (root-only,
in the agent's data dir) and its attempt's cgroup, so an agent that restarts (even
after SIGKILL) adopts the runners its previous incarnation started instead of losing
track of them, and kills through the cgroup whatever of an attempt outlived its
runner (a daemon in its own session included).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from corral.agent import joblock
from corral.agent.artifacts import Installer
from corral.agent.dirs import remove_known_dir
from corral.agent.identity import write_json_atomic
from corral.agent.proctree import kill_tree, same_process
from corral.agent.sandbox.host import Host
from corral.agent.zygote import (
    LOG_NAME,
    PID_NAME,
    ZygoteClient,
    ZygoteUnavailable,
    fingerprint,
    open_runners_log,
)
from corral.api import ObservedAttempt, StartOrder

log = logging.getLogger("corral.agent.supervisor")

ZYGOTE_READY_WAIT = 15.0  # a new zygote imports the runner's code first
ZYGOTE_RETRY_EVERY = 30.0  # a zygote that keeps failing is not restarted in a loop
ZYGOTE_RECHECK_EVERY = 2.0  # a zygote not ready is asked again at most this often


@dataclass
class Tracked:
    job_id: int
    attempt: int
    token: str
    dir: Path
    # None when forked by the zygote or adopted from an earlier incarnation: then the
    # runner is found through its runner.pid
    popen: subprocess.Popen | None = None


@dataclass
class Ended:
    """A runner that is gone. `report_lost` when it ended without telling the server."""

    job_id: int
    attempt: int
    token: str
    report_lost: bool
    reason: str


ATTEMPT_FILES = (
    "spec.json",
    "runner.pid",
    "command.json",
    "done.json",
    "evict.json",
)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def runner_environment() -> dict[str, str]:
    """A runner gets what it needs to run, not the agent's environment (which may
    hold a join token): the job's own environment is built from scratch anyway."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "VIRTUAL_ENV", "CORRAL_CA")
    return {k: v for k, v in os.environ.items() if k in keep}


def _reap_if_child(pid: int) -> None:
    """A runner adopted across a re-exec is still our child: collect its exit status
    so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_child(pid: int, timeout: float) -> None:
    """Collect `pid` if it is our child, waiting up to `timeout` for it to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.02)


class Supervisor:
    def __init__(
        self,
        data_dir: Path,
        servers: list[str],
        instance_id: str | None = None,
        installer: Installer | None = None,
        host: Host | None = None,
        zygote: bool = True,
    ):
        self.data_dir = data_dir
        self.attempts_dir = data_dir / "attempts"
        self.locks_dir = data_dir / "locks"
        self.servers = servers
        self.instance_id = instance_id
        self.installer = installer
        self.host = host or Host("plain", str(data_dir / "jobs"), "", os.getuid(), os.getgid())
        self.tracked: dict[tuple[int, int], Tracked] = {}
        self.attempts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.use_zygote = zygote and os.environ.get("CORRAL_ZYGOTE", "1") != "0"
        self.zygote = ZygoteClient(data_dir)
        self.zygote_ready = False
        self._zygote_popen: subprocess.Popen | None = None
        self._zygote_started_at: float | None = None
        self._zygote_recheck_at = 0.0

    @staticmethod
    def dirname(job_id: int, attempt: int) -> str:
        return f"{job_id}-{attempt}"

    # -- lifecycle ------------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take over the runners an earlier incarnation of this agent left running, and
        kill any attempt's cgroup that has no attempt directory any more."""
        for d in sorted(self.attempts_dir.iterdir()):
            spec = _read_json(d / "spec.json")
            if spec is None:
                shutil.rmtree(d, ignore_errors=True)
                continue
            key = (spec["job_id"], spec["attempt"])
            self.tracked[key] = Tracked(spec["job_id"], spec["attempt"], spec["token"], d)
            log.info("adopted attempt %s/%s", *key)
        cg = self.host.cgroups
        for key in cg.attempts() if cg is not None else []:
            if key not in self.tracked and cg is not None:
                group = cg.attempt(*key)
                group.kill()
                group.remove()
                log.warning("killed the leftovers of attempt %s/%s (no runner)", *key)
        if self.use_zygote:
            self.attach_zygote()

    # -- the zygote -----------------------------------------------------------------------------

    def attach_zygote(self, wait: float = ZYGOTE_READY_WAIT) -> bool:
        """Use the zygote an earlier incarnation started if it is there and of this
        build; else start one (and wait up to `wait` seconds for it to answer)."""
        try:
            reply = self.zygote.ping()
        except ZygoteUnavailable:
            reply = None
        if reply is not None and reply.get("version") == fingerprint():
            self.zygote_ready = True
            log.info("attached to zygote %s", reply.get("pid"))
            return True
        if reply is not None:
            log.info(
                "zygote %s runs another build (%s); replacing it",
                reply.get("pid"),
                reply.get("version"),
            )
            self.stop_zygote()
        self._spawn_zygote()
        if wait <= 0:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.zygote.ping()
                self.zygote_ready = True
                return True
            except ZygoteUnavailable:
                if self._zygote_popen is not None and self._zygote_popen.poll() is not None:
                    break
                time.sleep(0.02)
        log.warning(
            "the zygote did not start (see %s); runners are spawned instead",
            self.data_dir / LOG_NAME,
        )
        return False

    def _spawn_zygote(self) -> None:
        self.zygote_ready = False
        self._zygote_started_at = time.monotonic()
        self._reap_zygote()
        try:
            self.zygote.socket_file.unlink()  # a dead zygote's (a live one answered)
        except FileNotFoundError:
            pass
        with open(self.data_dir / LOG_NAME, "ab") as out:
            self._zygote_popen = subprocess.Popen(
                [sys.executable, "-m", "corral.agent.zygote", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # like the runners: it outlives an agent restart
                env=runner_environment(),
                cwd="/",
            )
        log.info("started zygote (pid %d)", self._zygote_popen.pid)

    def _reap_zygote(self) -> None:
        if self._zygote_popen is not None and self._zygote_popen.poll() is not None:
            self._zygote_popen = None
        info = _read_json(self.data_dir / PID_NAME)
        if info and isinstance(info.get("pid"), int):
            _reap_if_child(info["pid"])  # started by this process before a re-exec

    def stop_zygote(self) -> None:
        """Tell the zygote to exit (its runners go on). For a stopping agent."""
        self.zygote_ready = False
        info = _read_json(self.data_dir / PID_NAME) or {}
        try:
            self.zygote.quit()
        except ZygoteUnavailable:
            return
        if self._zygote_popen is not None:
            try:
                self._zygote_popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._zygote_popen = None
        elif isinstance(info.get("pid"), int):
            _wait_child(info["pid"], 5.0)  # ours if started before a re-exec

    def _start_by_zygote(self, d: Path) -> int | None:
        """The runner's pid, forked by the zygote; None when it could not (then the
        caller spawns one, and a new zygote is on its way for the next attempts)."""
        if not self.use_zygote:
            return None
        if not self.zygote_ready:
            # being started, or failed a while ago: look again now and then, briefly
            # (this runs on the agent's event loop; a hung zygote must not stall it)
            now = time.monotonic()
            if now < self._zygote_recheck_at:
                return None
            self._zygote_recheck_at = now + ZYGOTE_RECHECK_EVERY
            try:
                self.zygote.ping(timeout=0.5)
                self.zygote_ready = True
            except ZygoteUnavailable:
                self._maybe_respawn_zygote()
                return None
        try:
            return self.zygote.start(d)
        except ZygoteUnavailable as exc:
            log.warning("%s; spawning the runner of %s instead", exc, d.name)
            self.zygote_ready = False
            self._reap_zygote()
            self._maybe_respawn_zygote()
            return None

    def _maybe_respawn_zygote(self) -> None:
        started = self._zygote_started_at
        if started is None or time.monotonic() - started >= ZYGOTE_RETRY_EVERY:
            self._spawn_zygote()

    def start(self, order: StartOrder) -> None:
        key = (order.job_id, order.attempt)
        if key in self.tracked:
            return
        d = self.attempts_dir / self.dirname(*key)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        job_dir = Path(self.host.jobs_dir) / f"{self.dirname(*key)}-{secrets.token_hex(6)}"
        write_json_atomic(
            d / "spec.json",
            {
                "job_id": order.job_id,
                "attempt": order.attempt,
                "token": order.token,
                "command": order.command,
                "env": order.env,
                "cpus": order.cpus,
                "memory_mb": order.memory_mb,
                "log_limit": order.log_limit,
                "servers": self.servers,
                "instance_id": self.instance_id,
                "data_dir": str(self.data_dir),
                "inputs": [i.model_dump() for i in order.inputs],
                "workdir": order.workdir.model_dump() if order.workdir else None,
                "job_lock": str(self._job_lock(order.job_id)),
                "job_dir": str(job_dir),
                "sandbox": self.host.to_json(),
            },
            durable=False,
        )
        if self.installer is None or self.installer.installed("runner") is None:
            pid = self._start_by_zygote(d)
            if pid is not None:
                self.tracked[key] = Tracked(order.job_id, order.attempt, order.token, d)
                log.info("forked runner for attempt %s/%s (pid %d)", *key, pid)
                return
        with open(open_runners_log(self.data_dir), "ab") as out:
            popen = subprocess.Popen(
                [*self.runner_command(), str(d)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=runner_environment(),
            )
        self.tracked[key] = Tracked(order.job_id, order.attempt, order.token, d, popen)
        log.info("started runner for attempt %s/%s (pid %d)", *key, popen.pid)

    def runner_command(self) -> list[str]:
        """The installed `runner` component if there is one, else the built-in runner."""
        installed = self.installer.installed("runner") if self.installer else None
        if installed is not None:
            return [str(installed.path)]
        return [sys.executable, "-m", "corral.agent.runner"]

    def observed(self) -> list[ObservedAttempt]:
        return [
            ObservedAttempt(job_id=t.job_id, attempt=t.attempt, token=t.token)
            for t in self.tracked.values()
        ]

    def _runner(self, t: Tracked) -> psutil.Process | None:
        if t.popen is not None:
            if t.popen.poll() is not None:
                return None
            return same_process(t.popen.pid, None)
        info = _read_json(t.dir / "runner.pid")
        if info is None:
            return None
        proc = same_process(info["pid"], info.get("create_time"))
        if proc is None:
            _reap_if_child(info["pid"])
        return proc

    def _command_pgid(self, t: Tracked) -> int | None:
        info = _read_json(t.dir / "command.json")
        return info["pgid"] if info else None

    def _end_attempt(self, t: Tracked) -> None:
        """Whatever of the attempt is left dies: through its cgroup, whatever it did
        with sessions and forks; without cgroups, its command's process group."""
        cg = self.host.cgroups
        if cg is not None:
            group = cg.attempt(t.job_id, t.attempt)
            group.kill(grace=2.0)
            group.remove()
        pgid = self._command_pgid(t)
        if cg is None and pgid is not None:
            kill_tree([], pgid, grace=2.0)
        spec = _read_json(t.dir / "spec.json")
        if spec and spec.get("job_dir"):
            shutil.rmtree(spec["job_dir"], ignore_errors=True)

    def reap(self) -> list[Ended]:
        """Collect runners that are gone; say which ended without reporting."""
        ended = []
        for _key, t in list(self.tracked.items()):
            if self._runner(t) is not None:
                continue
            done = _read_json(t.dir / "done.json")
            # the command may outlive a runner that was SIGKILLed: take it down too
            self._end_attempt(t)
            if done is None:
                code = t.popen.returncode if t.popen is not None else None
                reason = f"runner exited unexpectedly (code {code})"
                log.warning("attempt %s/%s ended: %s", t.job_id, t.attempt, reason)
                ended.append(Ended(t.job_id, t.attempt, t.token, True, reason))
            else:
                status = str(done.get("status", ""))
                why = done.get("reason")
                # the runner's own account, kept here once its directory is removed
                log.info(
                    "attempt %s/%s ended: %s%s",
                    t.job_id,
                    t.attempt,
                    status,
                    f" ({why})" if why else "",
                )
                ended.append(Ended(t.job_id, t.attempt, t.token, False, status))
        return ended

    def _job_lock(self, job_id: int) -> Path:
        return self.locks_dir / f"job-{job_id}.lock"

    def forget(self, job_id: int, attempt: int) -> None:
        """The attempt's directory goes, then its tracking: whoever sees an attempt no
        longer tracked (another thread of the agent, a test) finds its directory gone."""
        t = self.tracked.get((job_id, attempt))
        if t is not None:
            remove_known_dir(t.dir, ATTEMPT_FILES)
            self.tracked.pop((job_id, attempt), None)
            # a runner that was killed left the job's lock file (a runner that ended
            # removed it; one of a later attempt of the job holds it: kept)
            joblock.sweep(self._job_lock(job_id))

    def job_dirs(self) -> dict[tuple[int, int], str]:
        """Each live attempt's private directory (from its spec)."""
        out = {}
        for key, t in list(self.tracked.items()):
            spec = _read_json(t.dir / "spec.json")
            if spec and spec.get("job_dir"):
                out[key] = str(spec["job_dir"])
        return out

    def evict(self, job_id: int, attempt: int, reason: str) -> bool:
        """End the attempt as the job's failure, with `reason`: its runner kills the
        command and reports the result (SIGUSR1, the reason in evict.json); a runner
        that is gone is killed as by `kill`. Blocking: call it off the event loop."""
        t = self.tracked.get((job_id, attempt))
        if t is None:
            return False
        note = t.dir / "evict.json"
        if note.exists():
            return True  # asked already; its runner is on it
        runner = self._runner(t)
        if runner is None:
            return self.kill(job_id, attempt, reason)
        try:
            write_json_atomic(note, {"reason": reason}, 0o600, durable=False)
            runner.send_signal(signal.SIGUSR1)
        except (OSError, psutil.Error):
            return self.kill(job_id, attempt, reason)
        log.warning("evicting attempt %s/%s: %s", job_id, attempt, reason)
        return True

    def kill(self, job_id: int, attempt: int, reason: str) -> bool:
        """Kill the attempt's runner and its command's whole process tree; its result
        is never reported. Blocking: call it off the event loop."""
        t = self.tracked.get((job_id, attempt))
        if t is None:
            return False
        try:
            write_json_atomic(
                t.dir / "done.json", {"status": "killed", "reason": reason}, 0o600, durable=False
            )
        except OSError:  # e.g. a full disk: the kill matters more than the note
            pass
        runner = self._runner(t)
        if runner is not None:
            # the runner takes its command's tree down on SIGTERM; give it the chance
            try:
                runner.send_signal(signal.SIGTERM)
                runner.wait(timeout=8)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
        kill_tree([runner] if runner is not None else [], None, grace=2.0)
        self._end_attempt(t)
        if t.popen is not None:
            try:
                t.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.forget(job_id, attempt)
        log.info("killed attempt %s/%s: %s", job_id, attempt, reason)
        return True
