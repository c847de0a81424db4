"""The agent's peer endpoint: other agents (and servers) fetch objects from it.

Every request carries a one-time token; the agent asks the server whether the token
lets its bearer fetch that object now (the server refuses if the recipient is not a
running instance). Nothing is served on the agent's own judgement.

Two routes, GET /objects/SHA256 and GET /health, one request per connection. Requests
are parsed by h11; an object's bytes go out with sendfile(2) straight from the store
(no copy through Python: a drain moves every byte an instance holds through here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable

import h11

from corral.agent.objects import ObjectStore
from corral.agent.transfer import PEER_RECIPIENT_HEADER, PEER_TOKEN_HEADER

log = logging.getLogger("corral.agent.peer")

# (sha256, token, recipient instance) -> why not, or None
Verify = Callable[[str, str, str | None], Awaitable[str | None]]

OBJECT_PATH = re.compile(r"/objects/([0-9a-f]{64})")
REQUEST_TIMEOUT = 30.0  # a request's head must arrive within this
MAX_HEAD = 64 * 1024


class PeerServer:
    def __init__(self, store: ObjectStore, verify: Verify, host: str, port: int):
        # IPPROTO_TCP: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on
        # sockets that say they are TCP (as the server's, corral.server.main.bind)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.store = store
        self.verify = verify
        self._server: asyncio.Server | None = None
        self._stopped = False

    async def serve(self) -> None:
        if self._stopped:
            return
        self._server = await asyncio.start_server(self._handle, sock=self.sock)
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    def stop(self) -> None:
        self._stopped = True
        if self._server is not None:
            self._server.close()

    # -- one connection, one request -----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            request = await asyncio.wait_for(self._request(conn, reader), REQUEST_TIMEOUT)
            if request is not None:
                await self._respond(conn, writer, request)
        except (h11.RemoteProtocolError, TimeoutError):
            with contextlib.suppress(h11.LocalProtocolError):
                await self._send_json(conn, writer, 400, {"error": "bad request"})
        except (ConnectionError, OSError):
            pass  # the peer went away
        except Exception:  # a bug: say so; the peer sees the connection close
            log.exception("serving a peer request broke")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @staticmethod
    async def _request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # the connection closed before a request

    async def _respond(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request
    ) -> None:
        target = req.target.decode("ascii", "replace").split("?", 1)[0]
        if target == "/health":
            await self._send_json(conn, writer, 200, {"ok": True})
            return
        m = OBJECT_PATH.fullmatch(target)
        if m is None:
            await self._send_json(conn, writer, 404, {"error": "not found"})
            return
        if req.method not in (b"GET", b"HEAD"):
            await self._send_json(conn, writer, 405, {"error": "method not allowed"})
            return
        sha = m.group(1)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
        token = headers.get(PEER_TOKEN_HEADER.lower())
        if not token:
            await self._send_json(conn, writer, 401, {"error": f"missing {PEER_TOKEN_HEADER}"})
            return
        why = await self.verify(sha, token, headers.get(PEER_RECIPIENT_HEADER.lower()) or None)
        if why is not None:
            log.warning("refused object %s: %s", sha[:12], why)
            await self._send_json(conn, writer, 403, {"error": why})
            return
        try:
            f = os.fdopen(os.open(self.store.path(sha), os.O_RDONLY), "rb")
        except FileNotFoundError:
            await self._send_json(conn, writer, 404, {"error": "not held here"})
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("content-type", "application/octet-stream"),
                            ("content-length", str(size)),
                            ("connection", "close"),
                        ],
                    )
                )
                or b""
            )
            if req.method == b"GET" and size:
                # zero-copy from the page cache to the socket (asyncio falls back to
                # read/write where sendfile is not available)
                await asyncio.get_running_loop().sendfile(writer.transport, f, 0, size)
            await writer.drain()

    @staticmethod
    async def _send_json(
        conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: dict
    ) -> None:
        data = json.dumps(body).encode()
        head = h11.Response(
            status_code=status,
            headers=[
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
                ("connection", "close"),
            ],
        )
        writer.write((conn.send(head) or b"") + (conn.send(h11.Data(data=data)) or b""))
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
