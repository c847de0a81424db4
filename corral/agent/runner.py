"""The runner: one process per job attempt.

It takes the per-job lock (so two runners of one job can never run on this instance,
whatever the agent believes; the lock is the runner's alone, never passed to the
command, so no process of a dead attempt can hold it), reports start, prepares the
attempt's sandbox (a private directory owned by the job user, a cgroup with its
limits, inputs and the shipped working directory), runs the command inside it with
an environment built from scratch, streams its output up to the log limit,
heartbeats the attempt, collects its outputs without following links, and reports
the result, every call carrying the attempt's fencing token (which lives only here
and in the root-only attempt directory, never within the job's reach). A 409 on any
call means this attempt is no longer the job's current one: the runner kills the
whole attempt and exits without reporting anything more.

Files in the attempt directory (the agent's, never the job's): spec.json (written by
the agent), runner.pid (by the zygote that forked the runner, or the runner),
command.json (only without a cgroup: the agent then ends a dead runner's command by
its process group), done.json (written last: how the runner ended). The job's own
directory is elsewhere (spec "job_dir").

A trivial job costs the runner no thread: the command's pipes and exit are watched
on the main thread, and the log shipper (which also heartbeats) starts only when
output has waited LOG_LINGER, or the attempt has run about a second.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil

from corral.agent import joblock, transfer
from corral.agent.identity import write_json_atomic
from corral.agent.libc import libc
from corral.agent.objects import ObjectStore
from corral.agent.relay import NotRelayed, RelayClient
from corral.agent.sandbox.attempt import AttemptSandbox
from corral.agent.sandbox.cgroups import Stats
from corral.agent.sandbox.host import Host
from corral.agent.sandbox.jobuser import JobUserError
from corral.agent.transfer import TransferError
from corral.agent.upstream import RETRY_STATUSES, Response, SyncServer, Unreachable
from corral.domain.sandbox import (
    DEFAULT_LOG_LIMIT,
    command_result,
    cut_log,
    not_found_reason,
)

ATTEMPT_TOKEN_HEADER = "X-Corral-Attempt-Token"
CHUNK = 64 * 1024
MAX_BATCH_BYTES = 512 * 1024
MAX_BATCH_CHUNKS = 1000  # what a LogBatch (and a finish) takes
LOG_LINGER = 0.1  # new output waits this long for more, or for the command's end
POLL = 0.2  # how often the runner looks at its stale, terminated and evicted flags
EVICTED = "killed by its agent"
MAX_BUFFERED = 64 * 1024 * 1024  # past this, the command blocks on its pipe
HEARTBEAT_EVERY = 5.0
LOCK_WAIT = 60.0
EXIT_STALE = 75
SELF_TEST_OK = "corral-runner ok"
DISK_FULL = "no space left on device while writing outputs"
KILL_GRACE = 3.0


class Stale(Exception):
    """The server refused this attempt's token: another attempt (or a cancel) won."""


class LogBuffer:
    """Output waiting to be shipped, numbered in order; bounded so a silent server
    slows the command down instead of exhausting memory. Past the attempt's log
    limit, output is still read (the command goes on) but only the marker is kept."""

    def __init__(self, limit: int = DEFAULT_LOG_LIMIT) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[int, str, bytes]] = []
        self._bytes = 0
        self._seq = 0
        self.closed_streams = 0
        self.limit = limit
        self.used = 0

    def put(self, stream: str, data: bytes) -> None:
        with self._cond:
            data, _cut = cut_log(self.used, self.limit, data)
            if not data:
                return
            self.used += len(data)
            while self._bytes > MAX_BUFFERED:
                self._cond.wait(0.5)
            self._items.append((self._seq, stream, data))
            self._seq += 1
            self._bytes += len(data)
            self._cond.notify_all()

    def size(self) -> int:
        """Bytes waiting to be shipped."""
        with self._cond:
            return self._bytes

    def full(self) -> bool:
        """Past MAX_BUFFERED: `put` would wait for the shipper."""
        with self._cond:
            return self._bytes > MAX_BUFFERED

    def stream_closed(self) -> None:
        with self._cond:
            self.closed_streams += 1
            self._cond.notify_all()

    def take(self, timeout: float, linger: float = 0.0) -> list[tuple[int, str, bytes]]:
        """The next batch to ship (waiting up to `timeout` for output), or [] once the
        command's streams are closed: what is left then goes with the finish. New
        output waits up to `linger` for more (a full batch does not wait), so the last
        output of a command that ends meanwhile rides with its finish."""
        with self._cond:
            if not self._items and self.closed_streams < 2:
                self._cond.wait(timeout)
            if linger and self._items:
                end = time.monotonic() + linger
                while self.closed_streams < 2 and self._bytes < MAX_BATCH_BYTES:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self.closed_streams >= 2:
                return []
            return _batches(self._items)[0] if self._items else []

    def rest(self) -> list[tuple[int, str, bytes]]:
        """Everything not shipped yet, in order."""
        with self._cond:
            return list(self._items)

    def shipped(self, batch: list) -> None:
        with self._cond:
            del self._items[: len(batch)]
            self._bytes -= sum(len(i[2]) for i in batch)
            self._cond.notify_all()

    def empty(self) -> bool:
        with self._cond:
            return not self._items


def _batches(items: list[tuple[int, str, bytes]]) -> list[list[tuple[int, str, bytes]]]:
    """Items in order, cut into batches of at most MAX_BATCH_BYTES (or one item) and
    MAX_BATCH_CHUNKS items."""
    out: list[list[tuple[int, str, bytes]]] = []
    batch: list[tuple[int, str, bytes]] = []
    size = 0
    for item in items:
        if batch and (size + len(item[2]) > MAX_BATCH_BYTES or len(batch) >= MAX_BATCH_CHUNKS):
            out.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += len(item[2])
    if batch:
        out.append(batch)
    return out


def _wire(batch: list[tuple[int, str, bytes]]) -> list[dict]:
    return [{"seq": s, "stream": st, "data": base64.b64encode(d).decode()} for s, st, d in batch]


class HttpError(RuntimeError):
    """The server answered a call with an error other than a refused token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Runner:
    def __init__(self, attempt_dir: Path):
        self.dir = attempt_dir
        self.spec = json.loads((attempt_dir / "spec.json").read_text())
        self.job_id = self.spec["job_id"]
        self.attempt = self.spec["attempt"]
        self.base = f"/api/v1/jobs/{self.job_id}/attempts/{self.attempt}"
        self.server = SyncServer(
            self.spec["servers"], headers={ATTEMPT_TOKEN_HEADER: self.spec["token"]}, timeout=30
        )
        self.relay = RelayClient(Path(self.spec["data_dir"]))  # the agent sends for many
        self.logs = LogBuffer(self.spec.get("log_limit") or DEFAULT_LOG_LIMIT)
        self.stale = threading.Event()
        self.terminated = threading.Event()
        self.evicted = threading.Event()  # the agent ends the attempt (evict.json says why)
        self.lock_fd: int | None = None
        self.host = Host.from_json(self.spec["sandbox"])
        self.sandbox = AttemptSandbox(
            self.host, self.job_id, self.attempt, Path(self.spec["job_dir"])
        )
        self._store: ObjectStore | None = None
        self.shipper: threading.Thread | None = None
        self.started_at = time.monotonic()

    @property
    def store(self) -> ObjectStore:
        """The agent's object store, opened (its directory made) when first used: a
        job without inputs or outputs never needs it."""
        if self._store is None:
            self._store = ObjectStore(Path(self.spec["data_dir"]))
        return self._store

    # -- talking to the server ----------------------------------------------------------------

    def call(self, action: str, body: dict | None = None, deadline: float | None = None) -> dict:
        if self.stale.is_set():
            raise Stale("already stale")
        resp = self._send(action, body, deadline)
        if resp.status_code in (401, 403, 404, 409):
            self.stale.set()
            raise Stale(f"{action}: HTTP {resp.status_code} {resp.text[:300]}")
        if resp.status_code >= 400:
            raise HttpError(
                resp.status_code, f"{action}: HTTP {resp.status_code} {resp.text[:300]}"
            )
        return resp.json()

    def _send(self, action: str, body: dict | None, deadline: float | None) -> Response:
        """Through the agent's relay (one request for many runners' reports), else
        straight to the server: every report is idempotent, so one the relay may
        have delivered can be sent again."""
        try:
            status, content = self.relay.report(
                self.job_id, self.attempt, self.spec["token"], action, body, self.terminated.is_set
            )
            if status not in RETRY_STATUSES:
                return Response(status, content)
        except NotRelayed:
            pass
        return self.server.request(
            "POST",
            f"{self.base}/{action}",
            json=body,  # start and heartbeat have none: no body, no check before reading it
            deadline=deadline,
            stop=self.terminated.is_set,
        )

    def call_anyway(self, action: str, body: dict) -> dict:
        """A call made after this runner stopped shipping (it clears the stale flag
        it set to stop the shipper; a real 409 sets it again)."""
        self.stale.clear()
        return self.call(action, body, deadline=time.monotonic() + 30)

    # -- the pieces ---------------------------------------------------------------------------

    def acquire_job_lock(self) -> bool:
        fd = joblock.acquire(
            Path(self.spec["job_lock"]),
            self.spec.get("lock_wait", LOCK_WAIT),
            give_up=self.terminated.is_set,
        )
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"attempt {self.attempt} runner pid {os.getpid()}\n".encode())
        self.lock_fd = fd
        return True

    def release_job_lock(self) -> None:
        """The attempt is over here (its processes gone, its result reported or
        refused): the lock's file goes with the lock."""
        if self.lock_fd is not None:
            joblock.release(Path(self.spec["job_lock"]), self.lock_fd)
            self.lock_fd = None

    def end_earlier_attempts(self) -> None:
        """With the job's lock held, no runner of another attempt of this job lives
        here: anything still in an earlier attempt's cgroup is a leftover. Kill it."""
        cg = self.host.cgroups
        if cg is None:
            return
        for job_id, n in cg.attempts():
            if job_id == self.job_id and n != self.attempt:
                group = cg.attempt(job_id, n)
                group.kill()
                group.remove()

    def read_stream(self, pipe, stream: str) -> None:
        try:
            while True:
                data = os.read(pipe.fileno(), CHUNK)
                if not data:
                    break
                self.logs.put(stream, data)
        finally:
            pipe.close()
            self.logs.stream_closed()

    def ship_logs(self, last_contact: float | None = None) -> None:
        """Ship output as it comes; heartbeat the attempt when there is none. Once the
        command's streams are closed, what is left is the finish's to carry.
        `last_contact`: when the server last heard of this attempt (its start)."""
        if last_contact is None:
            last_contact = time.monotonic()
        while not self.stale.is_set():
            batch = self.logs.take(timeout=0.2, linger=LOG_LINGER)
            try:
                if batch:
                    self.call("logs", {"chunks": _wire(batch)})
                    self.logs.shipped(batch)
                    last_contact = time.monotonic()
                elif self.logs.closed_streams >= 2:
                    return
                elif time.monotonic() - last_contact >= HEARTBEAT_EVERY:
                    self.call("heartbeat")
                    last_contact = time.monotonic()
            except (Stale, Unreachable):
                if self.stale.is_set() or self.terminated.is_set():
                    return
            except RuntimeError as exc:
                print(f"runner of attempt {self.job_id}/{self.attempt}: {exc}", file=sys.stderr)
                time.sleep(1)

    def start_shipper(self) -> None:
        """The shipper thread, started when there is something for it to do: output
        to ship, inputs to fetch (heartbeats meanwhile), or an attempt running long
        enough to need a heartbeat. A trivial job ends before any of it: its output
        rides with the finish, and the runner starts no thread at all."""
        if self.shipper is None:
            self.shipper = threading.Thread(
                target=self.ship_logs, args=(self.started_at,), daemon=True
            )
            self.shipper.start()

    def join_shipper(self) -> None:
        if self.shipper is not None:
            self.shipper.join()

    def done(self, status: str, **extra) -> None:
        write_json_atomic(
            self.dir / "done.json", {"status": status, **extra}, mode=0o600, durable=False
        )

    def fetch_inputs(self) -> None:
        """Each input object into the input dir (a copy: the job may not change the
        stored object), fetched from a peer if this instance does not hold it."""
        taken: set[str] = set()
        for inp in self.spec.get("inputs", []):
            src = transfer.fetch(
                self.store,
                inp["sha256"],
                inp["size"],
                inp["sources"],
                inp.get("token"),
                recipient=self.spec.get("instance_id"),
            )
            name = inp["name"].replace("/", "_") or inp["sha256"]
            if name in taken:
                name = f"{inp['sha256'][:12]}-{name}"
            taken.add(name)
            dest = self.sandbox.inputs / name
            shutil.copyfile(src, dest)
            self.sandbox.give(dest)

    def unpack_workdir(self) -> None:
        """The shipped working directory, extracted safely as the private work dir."""
        wd = self.spec.get("workdir")
        if not wd:
            return
        from corral.agent.sandbox.workdir import extract

        src = transfer.fetch(
            self.store,
            wd["sha256"],
            wd["size"],
            wd["sources"],
            wd.get("token"),
            recipient=self.spec.get("instance_id"),
        )
        extract(src, self.sandbox.work)
        self.sandbox.give(self.sandbox.work)

    # -- the whole attempt ----------------------------------------------------------------------

    def note_pid(self) -> None:
        """runner.pid names this process (the agent finds and adopts runners by it).
        A runner its zygote forked does not call this: the zygote writes runner.pid
        before it answers the agent (or kills the child); a spawned runner writes it
        here, unless the same pid and start time are there already."""
        me = {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
        path = self.dir / "runner.pid"
        try:
            if json.loads(path.read_text()) == me:
                return
        except (OSError, ValueError):
            pass
        write_json_atomic(path, me, mode=0o600, durable=False)

    def run(self, pid_noted: bool = False) -> int:
        if not pid_noted:
            self.note_pid()
        if not self.acquire_job_lock():
            # Another runner of this job is alive here. Report nothing: if that one
            # holds this very attempt, a report would hurt it; if not, this attempt
            # never started and the reaper requeues it after the start timeout.
            self.done("lock_timeout", reason="another runner of this job holds its lock")
            return EXIT_STALE
        try:
            self.end_earlier_attempts()
            try:
                self.call("start")
            except (Stale, Unreachable) as exc:
                self.done("stale", reason=str(exc))
                return EXIT_STALE
            self.started_at = time.monotonic()
            try:
                return self._run_started()
            finally:
                self.sandbox.remove()
        finally:
            self.release_job_lock()

    def _lost(self, reason: str) -> int:
        """The attempt could not run here (not the job's fault): report it lost so
        the job is tried again."""
        self.stale.set()
        self.join_shipper()
        try:
            self.call_anyway("lost", {"reason": reason[:4000]})
        except (Stale, Unreachable):
            pass
        self.done("lost", reason=reason)
        return EXIT_STALE

    def _run_started(self) -> int:
        try:
            self.sandbox.claim_user()
            self.sandbox.prepare(self.spec.get("cpus") or 0, self.spec.get("memory_mb") or 0)
        except (OSError, JobUserError) as exc:
            return self._lost(f"cannot prepare the attempt's sandbox: {exc}")
        if self.spec.get("inputs") or self.spec.get("workdir"):
            self.start_shipper()  # it heartbeats the attempt while inputs arrive
        try:
            self.fetch_inputs()
            self.unpack_workdir()
        except (TransferError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._lost(f"no space left on device for inputs: {exc}")
            return self._lost(f"inputs unavailable: {exc}")
        except Exception as exc:  # an unsafe or damaged working directory archive
            return self._end_early(None, f"workdir: {exc}")
        env = self.sandbox.environment(
            self.spec.get("env", {}),
            {
                "CORRAL_JOB_ID": str(self.job_id),
                "CORRAL_ATTEMPT": str(self.attempt),
                "CORRAL_INSTANCE_ID": self.spec.get("instance_id") or "",
                "CORRAL_OUTPUT_DIR": str(self.sandbox.outputs),
                "CORRAL_INPUT_DIR": str(self.sandbox.inputs),
                "CORRAL_WORKDIR": str(self.sandbox.work),
            },
        )
        command = self.spec["command"]
        try:
            proc = self.sandbox.spawn(command, env)
        except FileNotFoundError:
            return self._end_early(127, not_found_reason(command[0], env.get("PATH", "")))
        except PermissionError:
            return self._end_early(126, f"permission denied: {command[0]}")
        except (OSError, subprocess.SubprocessError) as exc:
            return self._end_early(
                126, f"cannot run {command[0]}: {getattr(exc, 'strerror', None) or exc}"
            )
        if self.sandbox.group is None:
            # the agent ends a dead runner's command by its process group when there
            # is no cgroup (with one, the attempt's cgroup is what it kills)
            write_json_atomic(
                self.dir / "command.json",
                {
                    "pid": proc.pid,
                    "pgid": proc.pid,
                    "create_time": psutil.Process(proc.pid).create_time(),
                },
                mode=0o600,
                durable=False,
            )
        returncode = self._watch(proc)
        evicted_only = not (self.stale.is_set() or self.terminated.is_set())
        if returncode is None and self.evicted.is_set() and evicted_only:
            return self._evicted(proc)
        if returncode is None:  # stale or terminated while the command ran
            self.sandbox.kill(KILL_GRACE)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            if self.terminated.is_set():
                self.done("killed", reason="runner terminated")
                return 0
            self.done("stale", reason="the server refused this attempt's token")
            return EXIT_STALE
        # the command is done; anything it left (in its cgroup, its session, or
        # re-parented to this subreaper) goes too, and with it any pipe a leftover
        # process still holds, so its output reaches end of file
        self.sandbox.kill(KILL_GRACE)
        self._drain(proc)
        if self.terminated.is_set():
            # stopped by the agent: the control plane decides what becomes of the
            # attempt, so its exit (likely our own SIGTERM) is not the job's result
            self.stale.set()
            self.join_shipper()
            self.done("killed", reason="runner terminated")
            return 0
        self.join_shipper()
        if self.stale.is_set():
            self.done("stale", reason="the server refused this attempt's token")
            return EXIT_STALE
        stats = self.sandbox.stats()
        shared = self.host.cgroups.memory_mb if self.host.cgroups else 0
        code, reason = command_result(
            returncode, stats.oom_kills, self.spec.get("memory_mb") or 0, shared
        )
        measured = self._measured(stats)
        try:
            collected = self.sandbox.collect(self.store)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return self.finish(None, DISK_FULL, measured=measured)
            return self.finish(None, f"could not store the job's outputs: {exc}", measured=measured)
        return self.finish(code, reason, collected.outputs, {**measured, "notes": collected.notes})

    def _watch(self, proc: subprocess.Popen) -> int | None:
        """Read the command's output into the log buffer until it exits (its exit
        status), or until the attempt is stale or the runner terminated (None). One
        thread: the command's pipes and its exit (a pidfd) in one selector; the
        shipper is started once output has waited LOG_LINGER (or fills a batch), or
        a heartbeat is near."""
        sel = selectors.DefaultSelector()
        pidfd = _pidfd(proc.pid)
        streams: dict[int, tuple[IO[bytes], str]] = {}
        for pipe, stream in ((proc.stdout, "out"), (proc.stderr, "err")):
            if pipe is not None:
                streams[pipe.fileno()] = (pipe, stream)
        try:
            for fd in streams:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ)
            paused = False  # past MAX_BUFFERED the pipes wait (and so does the command)
            waiting: float | None = None  # since when output waits for a shipper
            while True:
                if self.stale.is_set() or self.terminated.is_set() or self.evicted.is_set():
                    return None
                if proc.poll() is not None:
                    return proc.returncode
                timeout = POLL if pidfd is not None else 0.01
                if self.shipper is None:
                    now = time.monotonic()
                    if (
                        now - self.started_at >= POLL * 5  # heartbeats due at their times
                        or (waiting is not None and now - waiting >= LOG_LINGER)
                        or self.logs.size() >= MAX_BATCH_BYTES
                    ):
                        self.start_shipper()
                    elif waiting is not None:
                        timeout = min(timeout, waiting + LOG_LINGER - now)
                if self.logs.full() != paused:
                    paused = not paused
                    for fd in streams:
                        if paused:
                            sel.unregister(fd)
                        else:
                            sel.register(fd, selectors.EVENT_READ)
                if not sel.get_map():
                    time.sleep(POLL / 4)  # nothing to wait on but the buffer and the flags
                    continue
                for key, _ in sel.select(timeout):
                    if key.fd == pidfd:
                        continue  # proc.poll() collects it above
                    try:
                        data = os.read(key.fd, CHUNK)
                    except BlockingIOError:
                        continue
                    pipe, stream = streams[key.fd]
                    if data:
                        self.logs.put(stream, data)
                        if waiting is None:
                            # what the shipper would do: wait LOG_LINGER for more, or
                            # for the end (then the output rides with the finish)
                            waiting = time.monotonic()
                    else:
                        sel.unregister(key.fd)
                        del streams[key.fd]
                        pipe.close()
                        self.logs.stream_closed()
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            for fd in streams:
                os.set_blocking(fd, True)

    def _drain(self, proc: subprocess.Popen) -> None:
        """The rest of the command's output, to end of file (the attempt is killed
        by now: nothing can keep a pipe open)."""
        for pipe, stream in ((proc.stdout, "out"), (proc.stderr, "err")):
            if pipe is not None and not pipe.closed:
                self.read_stream(pipe, stream)

    def _evicted(self, proc: subprocess.Popen) -> int:
        """The agent ends the attempt (its disk ran low and this attempt held the most):
        the command dies at once and the attempt fails with the agent's reason; its
        outputs are not collected (they would go to the disk that is full)."""
        self.sandbox.kill(0)
        self._drain(proc)
        try:
            note = json.loads((self.dir / "evict.json").read_text())
            reason = str(note.get("reason") or EVICTED)
        except (OSError, ValueError, AttributeError):
            reason = EVICTED
        self.join_shipper()
        return self.finish(
            128 + signal.SIGKILL, reason, measured=self._measured(self.sandbox.stats())
        )

    def _measured(self, stats: Stats) -> dict:
        """What the attempt's cgroup counted, for its result."""
        return {
            "cpu_seconds": stats.cpu_seconds,
            "peak_memory_mb": stats.peak_memory_mb,
            "limits_enforced": self.sandbox.limits_enforced,
        }

    def _end_early(self, code: int | None, reason: str) -> int:
        """The command never ran: say why, as the attempt's result."""
        self.logs.stream_closed()
        self.logs.stream_closed()
        self.join_shipper()
        return self.finish(code, reason, measured={"limits_enforced": self.sandbox.limits_enforced})

    def finish(
        self,
        exit_code: int | None,
        reason: str | None,
        outputs: list | None = None,
        measured: dict | None = None,
    ) -> int:
        body: dict = {"exit_code": exit_code, "reason": reason, "outputs": outputs or []}
        body.update({k: v for k, v in (measured or {}).items() if v is not None})
        try:
            # the output not shipped yet: all but its last batch first, in order; the
            # last batch rides with the finish (stored with the result, before it)
            batches = _batches(self.logs.rest())
            for batch in batches[:-1]:
                self.call("logs", {"chunks": _wire(batch)})
                self.logs.shipped(batch)
            if batches:
                body["chunks"] = _wire(batches[-1])
            try:
                reply = self.call("finish", body)
            except HttpError as exc:
                if exc.status != 422 or "chunks" not in body:
                    raise
                # a server from before finishes carried chunks: ship them on their own
                self.call("logs", {"chunks": body.pop("chunks")})
                reply = self.call("finish", body)
        except (Stale, Unreachable) as exc:
            self.done("stale", reason=str(exc))
            return EXIT_STALE
        self.done("finished", exit_code=exit_code, job_state=reply.get("job_state"))
        return 0


def _pidfd(pid: int) -> int | None:
    """A pidfd of the command (readable once it exits), where the kernel has them."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _become_subreaper() -> None:
    """Orphaned grandchildren of the command re-parent to the runner, not init, so
    the runner can always find and kill the whole tree (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def main(argv: list[str] | None = None, pid_noted: bool = False) -> int:
    """`pid_noted`: runner.pid is (being) written by whoever forked this process."""
    argv = argv if argv is not None else sys.argv[1:]
    if argv == ["--self-test"]:
        print(SELF_TEST_OK)
        return 0
    if len(argv) != 1:
        print("usage: python -m corral.agent.runner ATTEMPT_DIR", file=sys.stderr)
        return 2
    _become_subreaper()
    runner = Runner(Path(argv[0]))

    def _terminate(signum, _frame):
        runner.terminated.set()

    def _evict(signum, _frame):
        runner.evicted.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGUSR1, _evict)
    return runner.run(pid_noted)


if __name__ == "__main__":
    sys.exit(main())
