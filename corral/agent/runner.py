"""The runner: one process per job attempt.

It takes the per-job lock (so two runners of one job can never run on this instance,
whatever the agent believes), reports start, runs the command in its own session,
streams its output, heartbeats the attempt, and reports the exit code — every call
carrying the attempt's fencing token. A 409 on any call means this attempt is no
longer the job's current one: the runner kills the command's whole process tree and
exits without reporting anything more.

Files in the attempt directory: spec.json (written by the agent), runner.pid,
command.json, done.json (written last: how the runner ended), work/ (the cwd).
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from corral.agent import transfer
from corral.agent.identity import write_json_atomic
from corral.agent.objects import ObjectStore
from corral.agent.proctree import kill_tree
from corral.agent.transfer import TransferError
from corral.agent.upstream import SyncServer, Unreachable

ATTEMPT_TOKEN_HEADER = "X-Corral-Attempt-Token"
CHUNK = 64 * 1024
MAX_BATCH_BYTES = 512 * 1024
MAX_BUFFERED = 64 * 1024 * 1024  # past this, the command blocks on its pipe
HEARTBEAT_EVERY = 5.0
LOCK_WAIT = 60.0
EXIT_STALE = 75
SELF_TEST_OK = "corral-runner ok"


class Stale(Exception):
    """The server refused this attempt's token: another attempt (or a cancel) won."""


class LogBuffer:
    """Output waiting to be shipped, numbered in order; bounded so a silent server
    slows the command down instead of exhausting memory."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[int, str, bytes]] = []
        self._bytes = 0
        self._seq = 0
        self.closed_streams = 0

    def put(self, stream: str, data: bytes) -> None:
        with self._cond:
            while self._bytes > MAX_BUFFERED:
                self._cond.wait(0.5)
            self._items.append((self._seq, stream, data))
            self._seq += 1
            self._bytes += len(data)
            self._cond.notify_all()

    def stream_closed(self) -> None:
        with self._cond:
            self.closed_streams += 1
            self._cond.notify_all()

    def take(self, timeout: float) -> list[tuple[int, str, bytes]]:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            batch: list[tuple[int, str, bytes]] = []
            size = 0
            for item in self._items:
                if batch and size + len(item[2]) > MAX_BATCH_BYTES:
                    break
                batch.append(item)
                size += len(item[2])
            return batch

    def shipped(self, batch: list) -> None:
        with self._cond:
            del self._items[: len(batch)]
            self._bytes -= sum(len(i[2]) for i in batch)
            self._cond.notify_all()

    def empty(self) -> bool:
        with self._cond:
            return not self._items


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
        self.logs = LogBuffer()
        self.stale = threading.Event()
        self.terminated = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None

    # -- talking to the server ----------------------------------------------------------------

    def call(self, action: str, body: dict | None = None, deadline: float | None = None) -> dict:
        if self.stale.is_set():
            raise Stale("already stale")
        resp = self.server.request(
            "POST",
            f"{self.base}/{action}",
            json=body or {},
            deadline=deadline,
            stop=self.terminated.is_set,
        )
        if resp.status_code in (401, 403, 404, 409):
            self.stale.set()
            raise Stale(f"{action}: HTTP {resp.status_code} {resp.text[:300]}")
        if resp.status_code >= 400:
            raise RuntimeError(f"{action}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json()

    # -- the pieces ---------------------------------------------------------------------------

    def acquire_job_lock(self) -> bool:
        path = Path(self.spec["job_lock"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.spec.get("lock_wait", LOCK_WAIT)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.write(fd, f"attempt {self.attempt} runner pid {os.getpid()}\n".encode())
                self.lock_fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() > deadline or self.terminated.is_set():
                    os.close(fd)
                    return False
                time.sleep(0.1)

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

    def ship_logs(self) -> None:
        """Ship output as it comes; heartbeat the attempt when there is none."""
        last_contact = time.monotonic()
        while not self.stale.is_set():
            batch = self.logs.take(timeout=0.2)
            try:
                if batch:
                    self.call(
                        "logs",
                        {
                            "chunks": [
                                {"seq": s, "stream": st, "data": base64.b64encode(d).decode()}
                                for s, st, d in batch
                            ]
                        },
                    )
                    self.logs.shipped(batch)
                    last_contact = time.monotonic()
                elif time.monotonic() - last_contact >= HEARTBEAT_EVERY:
                    self.call("heartbeat")
                    last_contact = time.monotonic()
                elif self.logs.closed_streams >= 2 and self.logs.empty():
                    return
            except (Stale, Unreachable):
                if self.stale.is_set() or self.terminated.is_set():
                    return
            except RuntimeError as exc:
                print(f"runner: {exc}", file=sys.stderr)
                time.sleep(1)

    def kill_command(self) -> None:
        roots = [psutil.Process()]  # the runner is a subreaper: orphans come back to it
        pgid = None
        if self.proc is not None:
            pgid = self.proc.pid
        try:
            kill_tree(list(roots[0].children(recursive=True)), pgid, grace=3.0)
        except psutil.Error:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def done(self, status: str, **extra) -> None:
        write_json_atomic(
            self.dir / "done.json", {"status": status, **extra}, mode=0o644, durable=False
        )

    # -- the whole attempt ----------------------------------------------------------------------

    def run(self) -> int:
        write_json_atomic(
            self.dir / "runner.pid",
            {"pid": os.getpid(), "create_time": psutil.Process().create_time()},
            mode=0o644,
            durable=False,
        )
        if not self.acquire_job_lock():
            # Another runner of this job is alive here. Report nothing: if that one
            # holds this very attempt, a report would hurt it; if not, this attempt
            # never started and the reaper requeues it after the start timeout.
            self.done("lock_timeout", reason="another runner of this job holds its lock")
            return EXIT_STALE
        try:
            self.call("start")
        except (Stale, Unreachable) as exc:
            self.done("stale", reason=str(exc))
            return EXIT_STALE
        shipper = threading.Thread(target=self.ship_logs, daemon=True)
        shipper.start()  # it also heartbeats the attempt while inputs arrive
        work, outputs, inputs = (self.dir / d for d in ("work", "outputs", "inputs"))
        for d in (work, outputs, inputs):
            d.mkdir(exist_ok=True)
        try:
            self.fetch_inputs(inputs)
        except (TransferError, OSError) as exc:
            self.stale.set()
            shipper.join()
            try:
                self.call_anyway("lost", {"reason": f"inputs unavailable: {exc}"[:4000]})
            except (Stale, Unreachable):
                pass
            self.done("lost", reason=str(exc))
            return EXIT_STALE
        env = {
            **os.environ,
            **self.spec.get("env", {}),
            "CORRAL_JOB_ID": str(self.job_id),
            "CORRAL_ATTEMPT": str(self.attempt),
            "CORRAL_INSTANCE_ID": self.spec.get("instance_id") or "",
            "CORRAL_OUTPUT_DIR": str(outputs),
            "CORRAL_INPUT_DIR": str(inputs),
        }
        command = self.spec["command"]
        try:
            self.proc = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=() if self.lock_fd is None else (self.lock_fd,),
            )
        except FileNotFoundError:
            return self.finish(127, f"command not found: {command[0]}")
        except PermissionError:
            return self.finish(126, f"permission denied: {command[0]}")
        except OSError as exc:
            return self.finish(126, f"cannot run {command[0]}: {exc.strerror or exc}")
        write_json_atomic(
            self.dir / "command.json",
            {
                "pid": self.proc.pid,
                "pgid": self.proc.pid,
                "create_time": psutil.Process(self.proc.pid).create_time(),
            },
            mode=0o644,
            durable=False,
        )
        readers = [
            threading.Thread(target=self.read_stream, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self.read_stream, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in readers:
            t.start()
        while True:
            try:
                code = self.proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if self.stale.is_set() or self.terminated.is_set():
                    self.kill_command()
                    if self.terminated.is_set():
                        self.done("killed", reason="runner terminated")
                        return 0
                    self.done("stale", reason="the server refused this attempt's token")
                    return EXIT_STALE
        # the command is done; anything it left in its session goes too (and with it
        # any pipe a leftover process still holds, so the readers reach end of file)
        self.kill_command()
        for t in readers:
            t.join()
        if self.terminated.is_set():
            # stopped by the agent: the control plane decides what becomes of the
            # attempt, so its exit (likely our own SIGTERM) is not the job's result
            self.stale.set()
            shipper.join()
            self.done("killed", reason="runner terminated")
            return 0
        shipper.join()
        if self.stale.is_set():
            self.done("stale", reason="the server refused this attempt's token")
            return EXIT_STALE
        try:
            produced = self.collect_outputs(outputs)
        except OSError as exc:
            return self.finish(
                code if code >= 0 else 128 - code, f"could not store the job's outputs: {exc}"
            )
        if code < 0:
            return self.finish(
                128 - code, f"killed by signal {signal.Signals(-code).name}", produced
            )
        return self.finish(code, None, produced)

    def fetch_inputs(self, into: Path) -> None:
        """Each input object into the input dir (a copy: the job may not change the
        stored object), fetched from a peer if this instance does not hold it."""
        store = ObjectStore(Path(self.spec["data_dir"]))
        taken: set[str] = set()
        for inp in self.spec.get("inputs", []):
            src = transfer.fetch(
                store, inp["sha256"], inp["size"], inp["sources"], inp.get("token")
            )
            name = inp["name"].replace("/", "_") or inp["sha256"]
            if name in taken:
                name = f"{inp['sha256'][:12]}-{name}"
            taken.add(name)
            shutil.copyfile(src, into / name)

    def collect_outputs(self, outputs: Path) -> list[dict]:
        """Every regular file under the output dir becomes an object in the store."""
        store = ObjectStore(Path(self.spec["data_dir"]))
        produced = []
        for root, dirs, files in os.walk(outputs, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                rel = path.relative_to(outputs).as_posix()
                if path.is_symlink() or not path.is_file():
                    print(f"runner: output {rel} is not a regular file; skipped", file=sys.stderr)
                    continue
                sha, size = store.add_file(path)
                produced.append({"path": rel, "sha256": sha, "size": size})
        return produced

    def call_anyway(self, action: str, body: dict) -> dict:
        """A call made after this runner stopped shipping (it clears the stale flag
        it set to stop the shipper; a real 409 sets it again)."""
        self.stale.clear()
        return self.call(action, body, deadline=time.monotonic() + 30)

    def finish(self, exit_code: int, reason: str | None, outputs: list | None = None) -> int:
        try:
            reply = self.call(
                "finish", {"exit_code": exit_code, "reason": reason, "outputs": outputs or []}
            )
        except (Stale, Unreachable) as exc:
            self.done("stale", reason=str(exc))
            return EXIT_STALE
        self.done("finished", exit_code=exit_code, job_state=reply.get("job_state"))
        return 0


def _become_subreaper() -> None:
    """Orphaned grandchildren of the command re-parent to the runner, not init, so
    the runner can always find and kill the whole tree (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def main(argv: list[str] | None = None) -> int:
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

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
