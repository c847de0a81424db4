"""The zygote: a long-lived runner parent per agent that forks one runner per attempt.

Starting a runner as a fresh Python process costs about 0.1 CPU-s of interpreter
start-up and imports, the largest part of a trivial job's cost. The zygote pays it
once: it imports the runner's code, then waits on a unix socket in the agent's data
dir (0600, in the 0700 data dir, and it checks its peer's uid). Asked to start an
attempt, it forks; the child leaves the zygote behind (its own session, the socket
closed, signal handlers reset, stdio on the agent's runners.log) and runs exactly
what `python -m corral.agent.runner ATTEMPT_DIR` runs (`runner.main`), so the
sandbox, the per-job lock, fencing and logs behave as with a spawned runner.

It keeps one child forked ahead (the spare: its own session, stdio on runners.log,
waiting on a pipe), so an attempt's request hands the spare its directory instead
of waiting for a fork and the child's first steps (3-5 ms measured on a 2-core VM);
a new spare is forked once the request is answered. A spare that finds the pipe
closed (the zygote gone or quitting) exits without running anything.

The zygote writes the child's runner.pid (pid and start time) before it answers, so
the agent can always find the runner again from its attempt directory, as it adopts
spawned runners. A child does not depend on the zygote after the fork: if the
zygote dies, its children are re-parented and go on; the agent sees them through
their runner.pid and their attempts' cgroups.

Like the runners, the zygote is detached from the agent (its own session), so it
survives an agent restart and the next agent re-attaches to it through the socket.
It exits when told to (a stopping agent, or an agent of another build), or when the
agent it serves has been gone for ORPHAN_GRACE seconds with no new agent attaching.

Protocol: one JSON line per connection each way. Requests carry "owner" (the
agent's pid and start time); "op" is "ping", "start" (with "dir") or "quit".
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import corral
from corral.agent.unixsock import socket_path

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("corral.agent.zygote")

SOCKET_NAME = "zygote.sock"
PID_NAME = "zygote.pid"
LOG_NAME = "zygote.log"
# what runners print (a crash's traceback): one file in the data dir for them all, so
# that it outlives the attempt's directory (and an attempt creates no file for it)
RUNNERS_LOG = "runners.log"
ORPHAN_GRACE = 60.0
OWNER_CHECK_EVERY = 1.0
REQUEST_TIMEOUT = 3.0  # the agent waits this long at most before spawning instead
MAX_REQUEST = 64 * 1024
EXIT_CHILD_CRASHED = 70
RUNNER_EXITS = (0, 75)  # how a runner ends as runners do: done, or stale (runner.EXIT_STALE)


class ZygoteUnavailable(Exception):
    """The zygote is not there or refused: start the runner another way."""


def fingerprint() -> str:
    """The build a zygote runs: an agent only uses a zygote of its own build."""
    return f"{corral.__version__} {sys.executable} {Path(corral.__file__).resolve().parent}"


def _owner() -> dict:
    import psutil

    return {"pid": os.getpid(), "create_time": psutil.Process().create_time()}


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


# -- the agent's side --------------------------------------------------------------------------


class ZygoteClient:
    """How the agent talks to its zygote."""

    def __init__(self, data_dir: Path, timeout: float = REQUEST_TIMEOUT):
        self.data_dir = data_dir
        self.timeout = timeout
        self._owner: dict | None = None

    @property
    def socket_file(self) -> Path:
        return self.data_dir / SOCKET_NAME

    def request(self, body: dict, timeout: float | None = None) -> dict:
        if self._owner is None:
            self._owner = _owner()
        try:
            with (
                socket_path(self.data_dir, SOCKET_NAME) as path,
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
            ):
                s.settimeout(timeout or self.timeout)
                s.connect(path)
                s.sendall(json.dumps({**body, "owner": self._owner}).encode() + b"\n")
                line = _read_line(s)
        except (OSError, ValueError) as exc:
            raise ZygoteUnavailable(f"cannot reach the zygote: {exc}") from exc
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise ZygoteUnavailable(f"the zygote answered {line[:200]!r}") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise ZygoteUnavailable(f"the zygote refused: {error}")
        return reply

    def ping(self, timeout: float | None = None) -> dict:
        return self.request({"op": "ping"}, timeout)

    def start(self, attempt_dir: Path) -> int:
        """Fork a runner for the attempt; its pid (runner.pid is written already)."""
        return int(self.request({"op": "start", "dir": str(attempt_dir)})["pid"])

    def quit(self) -> None:
        self.request({"op": "quit"})


# -- the zygote --------------------------------------------------------------------------------


def open_runners_log(data_dir: Path) -> int:
    """The runners' shared output file (appended to, the agent's only)."""
    return os.open(
        data_dir / RUNNERS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )


def _set_comm(name: bytes) -> None:
    """The process's short name in ps/top (the command line stays the zygote's)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_bytes(name[:15])


SPARE_COMM = b"corral-spare"  # a spare's name in ps until it is handed an attempt
SPARE_RETRY_EVERY = 30.0


@dataclasses.dataclass(frozen=True)
class Spare:
    pid: int
    create_time: float
    pipe: int  # the write end: the attempt directory, one line, then closed


class Zygote:
    def __init__(self, data_dir: Path, orphan_grace: float = ORPHAN_GRACE):
        self.data_dir = data_dir
        self.attempts_dir = (data_dir / "attempts").resolve()
        self.orphan_grace = orphan_grace
        self.listener: socket.socket | None = None
        self.children: set[int] = set()
        self.exited: list[tuple[int, int]] = []
        self.stopping = False
        self.owner: tuple[int, float] | None = None
        self.owner_gone_since: float | None = None
        self.owner_checked_at = 0.0
        self.inode: int | None = None
        self.runners_log: int | None = None
        self.spare: Spare | None = None
        self.spare_retry_at = 0.0  # a spare that died unused is not replaced at once

    # -- start-up and the loop --------------------------------------------------------------

    def preload(self) -> None:
        """Everything a runner imports, imported once here (that is the point)."""
        import encodings.idna  # noqa: F401 - the runner's first connect() encodes its host with it

        import corral.agent.runner
        import corral.agent.sandbox.workdir  # noqa: F401
        from corral.agent.sandbox import cgroups

        with contextlib.suppress(OSError):
            cgroups.cgroup_mounts()  # read by each runner's spawn otherwise

    def bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with socket_path(self.data_dir, SOCKET_NAME) as path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a dead zygote's: the agent checked before starting us
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        os.chmod(self.data_dir / SOCKET_NAME, 0o600)
        self.inode = os.stat(self.data_dir / SOCKET_NAME).st_ino
        sock.listen(64)
        self.listener = sock
        return sock

    def serve(self) -> int:
        import psutil

        from corral.agent.identity import write_json_atomic

        self.preload()
        listener = self.bind()
        self.runners_log = open_runners_log(self.data_dir)
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        write_json_atomic(
            self.data_dir / PID_NAME,
            {"pid": os.getpid(), "create_time": psutil.Process().create_time()},
            durable=False,
        )
        gc.freeze()  # what is loaded now stays shared with the children, not copied
        _set_comm(b"corral-zygote")
        log.info("zygote %d ready (%s)", os.getpid(), fingerprint())
        try:
            self._keep_spare()
            while not self.stopping:
                try:
                    ready, _, _ = select.select([listener], [], [], 1.0)
                except InterruptedError:  # pragma: no cover - retried by Python (PEP 475)
                    ready = []
                self._log_exited()
                if ready:
                    self._accept()
                self._check_owner()
                if not self.stopping:
                    self._keep_spare()
        finally:
            self._cleanup()
        return 0

    def _on_sigchld(self, _signum, _frame) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.exited.append((pid, status))

    def _on_stop(self, _signum, _frame) -> None:
        self.stopping = True

    def _log_exited(self) -> None:
        while self.exited:
            pid, status = self.exited.pop(0)
            code = os.waitstatus_to_exitcode(status)
            # a line per attempt would grow zygote.log without end (the agent's own log
            # has each attempt's start); only a runner that did not end as runners do
            level = logging.DEBUG if code in RUNNER_EXITS else logging.WARNING
            log.log(level, "runner %d exited (code %s)", pid, code)

    def _check_owner(self) -> None:
        """At most once a second (the loop comes here after every request)."""
        from corral.agent.proctree import same_process

        now = time.monotonic()
        if now - self.owner_checked_at < OWNER_CHECK_EVERY:
            return
        self.owner_checked_at = now
        if self.owner is None or same_process(*self.owner) is not None:
            self.owner_gone_since = None
            return
        now = time.monotonic()
        if self.owner_gone_since is None:
            self.owner_gone_since = now
            log.info("agent %d is gone; waiting for the next one", self.owner[0])
        elif now - self.owner_gone_since > self.orphan_grace:
            log.info("no agent for %.0f s; exiting (runners go on)", self.orphan_grace)
            self.stopping = True

    def _cleanup(self) -> None:
        self._drop_spare()  # it reads the end of its pipe and exits
        if self.listener is not None:
            self.listener.close()
        # the socket file goes only if it is still ours (a successor may have bound anew)
        sock = self.data_dir / SOCKET_NAME
        with contextlib.suppress(OSError):
            if os.stat(sock).st_ino == self.inode:
                sock.unlink()
        pid_file = self.data_dir / PID_NAME
        with contextlib.suppress(OSError, ValueError):
            if json.loads(pid_file.read_text()).get("pid") == os.getpid():
                pid_file.unlink()
        log.info("zygote %d stopped", os.getpid())

    # -- one request ------------------------------------------------------------------------

    def _accept(self) -> None:
        if self.listener is None:
            return
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                reply = self._handle(conn)
            except Exception as exc:
                log.warning("request failed: %s", exc)
                reply = {"ok": False, "error": str(exc)[:500]}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _handle(self, conn: socket.socket) -> dict:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.geteuid():
            return {"ok": False, "error": f"uid {uid} may not use this zygote"}
        req = json.loads(_read_line(conn))
        owner = req.get("owner") or {}
        if owner.get("pid"):
            self.owner = (int(owner["pid"]), float(owner["create_time"]))
            self.owner_gone_since = None
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "version": fingerprint()}
        if op == "quit":
            self.stopping = True
            return {"ok": True}
        if op == "start":
            return {"ok": True, "pid": self._fork(self._attempt_dir(req.get("dir")), conn)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _attempt_dir(self, raw: object) -> Path:
        """Only an attempt directory of this agent (root-only, in its data dir): the
        runner trusts its spec.json, so nothing else may be run from here."""
        if not isinstance(raw, str):
            raise ValueError("no attempt directory")
        d = Path(raw)
        st = os.lstat(d)
        if d.resolve().parent != self.attempts_dir or not os.path.isdir(d) or os.path.islink(d):
            raise ValueError(f"{raw} is not an attempt directory of this agent")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ValueError(f"{raw} is not private to the agent")
        if not (d / "spec.json").is_file():
            raise ValueError(f"{raw} has no spec.json")
        return d

    def _fork(self, attempt_dir: Path, conn: socket.socket) -> int:
        """The runner's pid: the spare handed `attempt_dir`, else a child forked now."""
        from corral.agent.identity import write_json_atomic

        spare = self._hand_over(attempt_dir)
        if spare is not None:
            pid, created = spare.pid, spare.create_time
        else:
            pid, created = self._forked(lambda mask: self._child(attempt_dir, conn, mask))
        try:
            write_json_atomic(
                attempt_dir / "runner.pid",
                {"pid": pid, "create_time": created},
                mode=0o600,
                durable=False,
            )
        except Exception:
            os.kill(pid, signal.SIGKILL)  # never a runner the agent cannot find
            raise
        log.debug("runner %d for %s (%s)", pid, attempt_dir.name, "spare" if spare else "forked")
        return pid

    def _hand_over(self, attempt_dir: Path) -> Spare | None:
        """Give the spare its attempt; None when there is no live spare to give it."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        try:
            if spare.pid not in self.children:
                return None  # it died waiting (collected by _on_sigchld)
            line = os.fsencode(attempt_dir) + b"\n"
            if b"\n" in line[:-1] or len(line) > select.PIPE_BUF:
                return None  # one write, whole or not at all
            os.write(spare.pipe, line)
            return spare
        except OSError:  # it died just now (EPIPE)
            return None
        finally:
            os.close(spare.pipe)

    def _keep_spare(self) -> None:
        """Fork a spare if there is none (after a request is answered: no one waits)."""
        if self.spare is not None and self.spare.pid not in self.children:
            self._drop_spare()  # it died waiting: something kills them; not in a loop
            self.spare_retry_at = time.monotonic() + SPARE_RETRY_EVERY
        if self.spare is not None or self.listener is None:
            return
        if time.monotonic() < self.spare_retry_at:
            return
        import psutil

        read_end, write_end = os.pipe2(os.O_CLOEXEC)

        def in_child(mask: set) -> None:
            os.close(write_end)
            self._spare_child(read_end, mask)  # never returns

        try:
            pid, created = self._forked(in_child)
        except (RuntimeError, OSError, psutil.Error):
            os.close(write_end)
            return
        finally:
            os.close(read_end)  # the parent's copy (the child never gets here)
        self.spare = Spare(pid, created, write_end)

    def _drop_spare(self) -> None:
        if self.spare is not None:
            os.close(self.spare.pipe)
            self.spare = None

    def _forked(self, in_child: Callable[[set], None]) -> tuple[int, float]:
        """Fork a child that runs `in_child(signal mask)` and never returns; its pid and
        start time, read before its exit can be collected (SIGCHLD is blocked until
        then), so that runner.pid can name it even if it is already gone."""
        import psutil

        if threading.active_count() != 1:
            raise RuntimeError("the zygote has threads; it does not fork")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                in_child(blocked)  # never returns
            self.children.add(pid)
            try:
                return pid, psutil.Process(pid).create_time()
            except psutil.Error:
                os.kill(pid, signal.SIGKILL)
                raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _child(self, attempt_dir: Path, conn: socket.socket, mask: set) -> None:
        """In the forked child: become an independent runner, run it, exit."""
        try:
            conn.close()
            self._leave(mask)
            _set_comm(b"corral-runner")
        except BaseException:
            _crashed(f"runner of attempt {attempt_dir.name}")
        self._run(attempt_dir)

    def _spare_child(self, pipe: int, mask: set) -> None:
        """In the forked spare: become an independent runner process, wait for an
        attempt directory on `pipe`, run it, exit (at once, on the pipe's end)."""
        try:
            self._leave(mask)
            _set_comm(SPARE_COMM)
            line = b""
            while not line.endswith(b"\n"):
                chunk = os.read(pipe, select.PIPE_BUF)
                if not chunk:
                    os._exit(0)  # the zygote is gone or quitting: no attempt for it
                line += chunk
            os.close(pipe)
            _set_comm(b"corral-runner")
            attempt_dir = Path(os.fsdecode(line[:-1]))
        except BaseException:
            _crashed("a spare runner")
        self._run(attempt_dir)

    def _leave(self, mask: set) -> None:
        """A forked child leaves the zygote behind: default signal handlers, no socket,
        its own session, its own random state, stdio on the agent's runners.log."""
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self.listener is not None:
            self.listener.close()
        os.setsid()  # its own session: nothing aimed at the zygote reaches it
        import random

        random.seed()  # also done by Python's at-fork hook; never shared state
        logging.root.handlers.clear()  # as a spawned runner: no log config
        out = self.runners_log if self.runners_log is not None else os.open(os.devnull, os.O_WRONLY)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)

    def _run(self, attempt_dir: Path) -> None:
        """Run the attempt's runner in this child, then exit with its code."""
        code = EXIT_CHILD_CRASHED
        try:
            from corral.agent import runner

            code = runner.main([str(attempt_dir)], pid_noted=True)  # see _fork
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            with contextlib.suppress(Exception):
                print(f"runner of attempt {attempt_dir.name} crashed:", file=sys.stderr)
                traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)


def spares(zygote: psutil.Process) -> list[psutil.Process]:
    """The spare a live zygote keeps forked (none, or one)."""
    import psutil

    out = []
    for child in zygote.children():
        with contextlib.suppress(psutil.Error):
            if child.name() == SPARE_COMM.decode():
                out.append(child)
    return out


def _crashed(what: str) -> NoReturn:
    with contextlib.suppress(Exception):
        print(f"{what} crashed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(EXIT_CHILD_CRASHED)


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) not in (1, 2):
        print("usage: python -m corral.agent.zygote DATA_DIR [ORPHAN_GRACE]", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    grace = float(argv[1]) if len(argv) == 2 else ORPHAN_GRACE
    try:
        return Zygote(Path(argv[0]), grace).serve()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("the zygote socket is in use: %s", exc)
        else:
            log.error("zygote: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
