"""The agent's peer endpoint: other agents (and servers) fetch objects from it.

Every request carries a one-time token; the agent asks the server whether the token
lets its bearer fetch that object now (the server refuses if the recipient is not a
running instance). Nothing is served on the agent's own judgement.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from corral.agent.objects import ObjectStore
from corral.agent.transfer import PEER_RECIPIENT_HEADER, PEER_TOKEN_HEADER

log = logging.getLogger("corral.agent.peer")

# (sha256, token, recipient instance) -> why not, or None
Verify = Callable[[str, str, str | None], Awaitable[str | None]]


def make_app(store: ObjectStore, verify: Verify) -> Starlette:
    async def get_object(request: Request):
        sha = request.path_params["sha256"]
        token = request.headers.get(PEER_TOKEN_HEADER)
        if not token:
            return JSONResponse({"error": f"missing {PEER_TOKEN_HEADER}"}, status_code=401)
        why = await verify(sha, token, request.headers.get(PEER_RECIPIENT_HEADER) or None)
        if why is not None:
            log.warning("refused object %s: %s", sha[:12], why)
            return JSONResponse({"error": why}, status_code=403)
        if not store.has(sha):
            return JSONResponse({"error": "not held here"}, status_code=404)
        return FileResponse(store.path(sha), media_type="application/octet-stream")

    async def health(_request: Request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/objects/{sha256}", get_object), Route("/health", health)])


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


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
        self.server = _Server(
            uvicorn.Config(
                make_app(store, verify), log_level="warning", access_log=False, lifespan="off"
            )
        )

    async def serve(self) -> None:
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True
