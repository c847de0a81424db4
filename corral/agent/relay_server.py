"""The agent's end of the attempt-report relay (corral.agent.relay says what it is):
reports queue here; one request at a time carries all that wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.agent.relay import MAX_REPORT, SOCKET_NAME
from corral.agent.unixsock import socket_path

log = logging.getLogger("corral.agent.relay")

MAX_BATCH = 256  # reports in one request (corral.api.jobs.MAX_RELAYED)
MAX_BATCH_BYTES = 4 * 1024 * 1024
# The agent tries a batch this long (failover, a 5xx) and then hands it back: the runners
# send their reports themselves, each with its own backoff and the server's Retry-After.
SEND_WITHIN = 2.0

Waiting = tuple[dict, int, asyncio.Future]  # a report, its size, where its answer goes

# sends reports as one request: their answers in order, or None (not delivered)
Send = Callable[[list[dict]], Awaitable[list[dict] | None]]


class RelayServer:
    """The agent's end: reports queue here; one request at a time carries all that wait."""

    def __init__(self, data_dir: Path, send: Send):
        self.data_dir = data_dir
        self.send = send
        self.waiting: list[Waiting] = []
        self.wake = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.sender: asyncio.Task | None = None
        self.serving: set[asyncio.Task] = set()  # one per connected runner
        self.batches = 0  # requests sent (tests and the journal read these)
        self.relayed = 0

    @property
    def socket_file(self) -> Path:
        return self.data_dir / SOCKET_NAME

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_file.unlink()  # an earlier agent's: nobody listens on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from the start: never reachable by anyone else
        try:
            with socket_path(self.data_dir, SOCKET_NAME) as path:
                sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        self.server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_REPORT + 4096
        )
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sender
        # the connections of runners still attached end here, not when the loop is
        # gone (their handlers would then be collected mid-wait, closing on a dead loop)
        for task in list(self.serving):
            task.cancel()
        await asyncio.gather(*self.serving, return_exceptions=True)
        for _report, _size, fut in self.waiting:
            if not fut.done():
                fut.set_result({"status": 0, "why": "the agent is stopping"})
        self.waiting.clear()
        with contextlib.suppress(OSError):
            self.socket_file.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.serving.add(task)
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.geteuid():
                return  # only this agent's runners (the socket's mode says so too)
            while True:
                line = await reader.readline()
                if not line:
                    return
                answer = await self._relay(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # a runner that went away, or sent a line too long: it goes direct
        finally:
            writer.close()
            if task is not None:
                self.serving.discard(task)

    async def _relay(self, line: bytes) -> dict:
        try:
            report = json.loads(line)
            if not isinstance(report, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return {"status": 0, "why": f"not a report: {exc}"}
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((report, len(line), fut))
        self.wake.set()
        return await fut

    async def _send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting:
                batch: list[Waiting] = []
                size = 0
                while self.waiting and len(batch) < MAX_BATCH:
                    if batch and size + self.waiting[0][1] > MAX_BATCH_BYTES:
                        break
                    item = self.waiting.pop(0)
                    batch.append(item)
                    size += item[1]
                await self._deliver(batch)

    async def _deliver(self, batch: list[Waiting]) -> None:
        try:
            answers = await self.send([report for report, _size, _fut in batch])
        except Exception as exc:  # whatever it was, the runners can go direct
            log.warning("relaying %d attempt reports failed: %s", len(batch), exc)
            answers = None
        self.batches += 1
        if answers is None or len(answers) != len(batch):
            answers = [{"status": 0, "why": "the relay could not deliver it"}] * len(batch)
        else:
            self.relayed += len(batch)
        for (_report, _size, fut), answer in zip(batch, answers, strict=True):
            if not fut.done():
                fut.set_result(answer)
