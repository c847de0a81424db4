"""Runners' attempt reports relayed by their agent.

A runner hands its start, heartbeat, logs, finish and lost reports to its agent over a
unix socket in the agent's data dir (`relay.sock`, 0600, the agent's uid only). The
agent sends whatever reports are waiting as one request (POST /api/v1/agents/attempts)
and hands each runner the answer its own route would have given. With sixteen attempts
starting and ending on an instance, that is one request where there were sixteen.

The relay adds no authority: every report carries its attempt's token and the server
fences it as before. And nothing depends on it: when the relay is not there (an agent
restarting, an older server, a report over MAX_REPORT), the runner sends the report to
the server itself, as it always could. Every report is idempotent, so a report the
relay may or may not have delivered is simply sent again.

Wire: one JSON line per report, one per answer, on a connection the runner keeps.
A report is {"job_id", "attempt", "token", "action", "body"}; an answer is
{"status": HTTP status, "body": the route's JSON body}, or {"status": 0, "why": ...}
when the report was not delivered (go direct).

This module is the runner's side, on the standard library alone (a runner is forked,
or spawned, per attempt: no asyncio); the agent's is corral.agent.relay_server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from corral.agent.unixsock import socket_path

SOCKET_NAME = "relay.sock"
MAX_REPORT = 1024 * 1024  # bytes of one report's JSON; larger ones go straight to the server
ANSWER_WITHIN = 5.0  # a runner waits this long for its answer, then goes direct
LOOK_EVERY = 0.25  # while waiting, how often the runner looks whether its agent is stopped


class NotRelayed(Exception):
    """The relay did not deliver this report: send it to the server directly."""


class RelayClient:
    """A runner's connection to its agent's relay (opened on first use, kept)."""

    def __init__(self, data_dir: Path, timeout: float = ANSWER_WITHIN):
        self.data_dir = data_dir
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._agent_pid = 0  # the relay's end (SO_PEERCRED)
        self.down_until = 0.0  # after a failure, go direct for a while

    def report(
        self,
        job_id: int,
        attempt: int,
        token: str,
        action: str,
        body: object,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[int, bytes]:
        """(status, the route's body) as the server answered; NotRelayed otherwise."""
        if time.monotonic() < self.down_until:
            raise NotRelayed("the relay failed a moment ago")
        line = json.dumps(
            {"job_id": job_id, "attempt": attempt, "token": token, "action": action, "body": body}
        ).encode()
        if len(line) > MAX_REPORT:
            raise NotRelayed("too large to relay")
        try:
            sock = self._connect()
            sock.sendall(line + b"\n")
            answer = json.loads(self._read_line(sock, stop))
            status = int(answer["status"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.close()
            self.down_until = time.monotonic() + 5.0
            raise NotRelayed(f"relay: {exc.__class__.__name__}: {exc}") from None
        if status == 0:
            raise NotRelayed(str(answer.get("why") or "not delivered"))
        return status, json.dumps(answer.get("body") or {}).encode()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(LOOK_EVERY)
                with socket_path(self.data_dir, SOCKET_NAME) as path:
                    sock.connect(path)
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                self._agent_pid = int.from_bytes(creds[:4], "little", signed=True)
            except OSError:
                sock.close()
                raise
            self._sock, self._buf = sock, b""
        return self._sock

    def _read_line(self, sock: socket.socket, stop: Callable[[], bool] | None) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer within {self.timeout:.0f} s")
            if stop is not None and stop():
                raise TimeoutError("stopped")
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if not _running(self._agent_pid):  # a stopped (frozen) agent answers nothing
                    raise TimeoutError("the agent is stopped") from None
                continue
            if not chunk:
                raise ConnectionError("the relay closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        self._agent_pid = 0
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock, self._buf = None, b""


def _running(pid: int) -> bool:
    """Whether the process is there and not stopped (SIGSTOP, a debugger) or dead."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"T", b"t", b"Z", b"X")
