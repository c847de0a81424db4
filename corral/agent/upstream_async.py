"""The agent's asynchronous HTTP to the servers, with the shared failover and retry
policy of upstream.py.

Requests are small JSON exchanges on kept-alive HTTP/1.1 connections (h11 reads and
writes the protocol; asyncio's streams carry it, TLS included). The agent sent them
through httpx before: its layers (a connection pool with anyio locks and cancel
scopes, request and response models, event hooks) cost about 2.4 ms of the agent's
CPU per request, a quarter of the agent's CPU per job in a burst, for exchanges whose
own work is a few hundred microseconds. Downloads (artifacts, inputs) still use httpx.

A connection is taken from the idle ones of the server in use (or opened), used for
one request at a time, and put back only when both sides finished the exchange
cleanly; a request that fails on a reused connection before any answer arrived (the
server closed it while it sat idle) is sent again at once on a new one, since every
agent request is idempotent.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import urllib.parse
from dataclasses import dataclass

import h11

from corral.agent import tls
from corral.agent.upstream import RETRY_STATUSES, Response, Upstream, retry_after

READ_CHUNK = 64 * 1024
MAX_IDLE = 8  # idle connections kept per server


class ConnectionFailed(Exception):
    """The connection broke before a whole answer arrived (`answered`: part of one)."""

    def __init__(self, message: str, answered: bool):
        super().__init__(message)
        self.answered = answered


@dataclass(eq=False)  # hashed by identity: the set of open ones
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


class AsyncServer:
    def __init__(
        self, urls: list[str], headers: dict[str, str] | None = None, timeout: float = 30.0
    ):
        self.upstream = Upstream(urls)
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._idle: dict[str, list[_Connection]] = {}
        self._open: set[_Connection] = set()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        deadline: float | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        retry = self.upstream.retry(deadline)
        body = None if json is None else jsonlib.dumps(json, separators=(",", ":")).encode()
        wanted = {**self.headers, **(headers or {})}
        while True:
            base = self.upstream.current
            try:
                resp = await self._send(base, method, path, body, wanted, timeout)
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                delay = retry.failed(
                    f"HTTP {resp.status_code}", retry_after(resp.headers.get("retry-after"))
                )
            except (OSError, TimeoutError, h11.ProtocolError, ConnectionFailed) as exc:
                delay = retry.failed(f"{exc.__class__.__name__}: {exc}".rstrip(": "))
            await asyncio.sleep(delay)

    async def _send(
        self,
        base: str,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> Response:
        parts = urllib.parse.urlsplit(base)
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            while True:
                conn = await self._take(base, parts)
                try:
                    resp = await self._exchange(conn, parts, method, path, body, headers)
                except ConnectionFailed as exc:
                    self._drop(conn)
                    if conn.reused and not exc.answered:
                        continue  # closed while idle: the same request on a new connection
                    raise
                except BaseException:
                    self._drop(conn)
                    raise
                self._give_back(base, conn)
                return resp

    async def _take(self, base: str, parts: urllib.parse.SplitResult) -> _Connection:
        idle = self._idle.get(base)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                conn.reused = True
                return conn
            self._drop(conn)
        secure = parts.scheme == "https"
        reader, writer = await asyncio.open_connection(
            parts.hostname,
            parts.port or (443 if secure else 80),
            ssl=tls.context() if secure else None,
            server_hostname=parts.hostname if secure else None,
        )
        conn = _Connection(reader, writer, h11.Connection(h11.CLIENT))
        self._open.add(conn)
        return conn

    async def _exchange(
        self,
        conn: _Connection,
        parts: urllib.parse.SplitResult,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> Response:
        fields = [("Host", parts.netloc), *headers.items()]
        if body is not None:
            fields += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        elif method not in ("GET", "HEAD"):
            fields.append(("Content-Length", "0"))
        http = conn.http
        out = http.send(h11.Request(method=method, target=parts.path + path, headers=fields))
        if body:
            out += http.send(h11.Data(data=body))
        out += http.send(h11.EndOfMessage())
        answered = False
        try:
            conn.writer.write(out)
            await conn.writer.drain()
            status = 0
            got: dict[str, str] = {}
            content = bytearray()
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await conn.reader.read(READ_CHUNK))
                    continue
                if isinstance(event, h11.Response):
                    answered = True
                    status = event.status_code
                    got = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    content += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return Response(status, bytes(content), got)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionFailed("the server closed the connection", answered)
        except (OSError, h11.RemoteProtocolError) as exc:
            raise ConnectionFailed(f"{exc.__class__.__name__}: {exc}", answered) from exc

    def _give_back(self, base: str, conn: _Connection) -> None:
        http = conn.http
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
            idle = self._idle.setdefault(base, [])
            if len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def close(self) -> None:
        for conn in list(self._open):
            self._drop(conn)
        self._idle.clear()
