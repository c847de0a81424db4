"""Run a server (and, for `corral up`, its local fleet) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

import uvicorn

from corral.heap import settle_heap
from corral.server.app import close_context, create_app, open_context, write_server_file
from corral.server.config import ServerConfig
from corral.server.context import ServerContext

log = logging.getLogger("corral.server")


def bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only
    # on sockets that say they are TCP. Without it every response's body waits for the
    # client's delayed ACK of its headers (~40 ms).
    sock = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def check_tls(config: ServerConfig) -> None:
    """Load the certificate and key once before anything starts, so a wrong file is
    one clear error (OSError) rather than a traceback from inside the server."""
    if config.tls_cert is None or config.tls_key is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(config.tls_cert), str(config.tls_key)
        )
    except (OSError, ssl.SSLError) as exc:
        raise OSError(
            f"cannot use --tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {exc}"
        ) from None


class _Server(uvicorn.Server):
    """On the first SIGINT/SIGTERM, stop the fleet this server runs (its agents kill
    their runners and report the attempts lost, so the jobs are requeued at once)
    while the API still answers; then stop serving. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext):
        super().__init__(config)
        self.ctx = ctx
        self._stopping: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._stopping is not None or not self.ctx.backends:
            self.force_exit = self._stopping is not None
            self.should_exit = True
            return
        self.ctx.stopping = True  # the dispatcher places nothing more
        log.warning("stopping: agents first, then the server (again to force)")
        self._stopping = asyncio.get_running_loop().create_task(self._stop_fleet())

    async def _stop_fleet(self) -> None:
        try:
            for backend in self.ctx.backends.values():
                await backend.close()
        finally:
            self.should_exit = True


async def serve(
    config: ServerConfig,
    *,
    prepare: Callable[[ServerContext], Awaitable[None]] | None = None,
    on_ready: Callable[[ServerContext], None] | None = None,
) -> None:
    """Bind, open the store, run until a signal, then stop everything in order.

    `prepare` runs after the store is open and before requests are served (corral up
    attaches its local backend there); `on_ready` once the server listens."""
    check_tls(config)
    sock = bind(config.host, config.port)
    config.port = sock.getsockname()[1]
    try:
        ctx = await open_context(config)
    except BaseException:
        sock.close()
        raise
    try:
        if prepare is not None:
            await prepare(ctx)
        app = create_app(ctx)
        server = _Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=3,
                ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
                ssl_keyfile=str(config.tls_key) if config.tls_key else None,
            ),
            ctx,
        )
        write_server_file(config, ctx)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.05)
        if server.started:
            settle_heap()
        if server.started and on_ready is not None:
            on_ready(ctx)
        await serving
    finally:
        await close_context(ctx)
        sock.close()
