"""The API server's accepted connections have TCP_NODELAY: without it a response
written in two segments (headers, body) waits for the client's delayed ACK (~40 ms on
Linux) before its body leaves, on every request. asyncio sets the option only on
sockets it knows are TCP, so the server's own listening socket must say so."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from corral.server.main import bind


async def _ok(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_accepted_connections_have_tcp_nodelay() -> None:
    async def main() -> list[int]:
        sock = bind("127.0.0.1", 0)  # as `corral server` binds its port
        server = uvicorn.Server(
            uvicorn.Config(_ok, log_level="warning", access_log=False, lifespan="off")
        )
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn has no event
                    await asyncio.sleep(0.01)
                reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
                writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                await writer.drain()
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
                accepted = [
                    c.transport.get_extra_info("socket") for c in server.server_state.connections
                ]
                flags = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted]
                writer.close()
                return flags
        finally:
            server.should_exit = True
            await serving
            sock.close()

    flags = asyncio.run(main())
    assert flags, "the server accepted no connection"
    assert all(flags), f"TCP_NODELAY off on the server's accepted sockets: {flags}"
