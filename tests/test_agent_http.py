"""The agent's HTTP to its servers (`corral.agent.upstream_async`), against a real HTTP
server on loopback: kept-alive connections, JSON both ways, a connection the server
closed while it sat idle, chunked answers, 503 with Retry-After, failover to the next
server, and a server that never answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from corral.agent.upstream import Unreachable
from corral.agent.upstream_async import AsyncServer


class Recorder:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()


def _handler(rec: Recorder, mode: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with rec.lock:
                rec.connections += 1

        def log_message(self, *_args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with rec.lock:
                rec.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(body) if body else None,
                    }
                )
                n = len(rec.requests)
            if mode == "busy-once" and n == 1:
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            answer = json.dumps({"n": n, "echo": rec.requests[-1]["body"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if mode == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for k in range(0, len(answer), 7):
                    piece = answer[k : k + 7]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            if mode == "close-after-each":
                # closes once answered, without saying so: the client finds out only
                # when it next uses the connection
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def http_server(mode: str = "plain") -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rec, mode))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_share_one_kept_alive_connection_with_json_both_ways():
    async def main(url: str) -> list:
        server = AsyncServer([url], headers={"Authorization": "Bearer a"}, timeout=10)
        try:
            out = []
            for k in range(5):
                resp = await server.request("POST", f"/api/x/{k}", json={"k": k})
                out.append((resp.status_code, resp.json()))
            return out
        finally:
            await server.close()

    with http_server() as (url, rec):
        answers = asyncio.run(main(url))
    assert answers == [(200, {"n": k + 1, "echo": {"k": k}}) for k in range(5)]
    assert rec.connections == 1
    assert [r["path"] for r in rec.requests] == [f"/api/x/{k}" for k in range(5)]
    assert {r["auth"] for r in rec.requests} == {"Bearer a"}


def test_a_connection_the_server_closed_while_idle_is_replaced():
    async def main(url: str) -> list[int]:
        server = AsyncServer([url], timeout=10)
        try:
            return [
                (await server.request("POST", "/c", json={"k": k}, deadline=None)).status_code
                for k in range(4)
            ]
        finally:
            await server.close()

    with http_server("close-after-each") as (url, rec):
        assert asyncio.run(main(url)) == [200] * 4
    assert len(rec.requests) == 4  # each request sent once
    assert rec.connections == 4


def test_a_chunked_answer_is_read_whole():
    async def main(url: str):
        server = AsyncServer([url], timeout=10)
        try:
            return (await server.request("POST", "/chunked", json={"long": "x" * 100})).json()
        finally:
            await server.close()

    with http_server("chunked") as (url, _rec):
        assert asyncio.run(main(url)) == {"n": 1, "echo": {"long": "x" * 100}}


def test_a_busy_answer_is_retried_after_what_retry_after_says():
    async def main(url: str) -> int:
        server = AsyncServer([url], timeout=10)
        try:
            resp = await server.request("POST", "/busy", json={}, deadline=time.monotonic() + 30)
            return resp.status_code
        finally:
            await server.close()

    with http_server("busy-once") as (url, rec):
        assert asyncio.run(main(url)) == 200
    assert len(rec.requests) == 2


def test_a_server_that_refuses_connections_is_failed_over():
    async def main(urls: list[str]) -> tuple[int, str]:
        server = AsyncServer(urls, timeout=10)
        try:
            resp = await server.request("POST", "/f", json={}, deadline=time.monotonic() + 30)
            return resp.status_code, server.upstream.current
        finally:
            await server.close()

    with http_server() as (url, rec):
        dead = f"http://127.0.0.1:{_closed_port()}"
        assert asyncio.run(main([dead, url])) == (200, url)
    assert len(rec.requests) == 1


def test_a_server_that_never_answers_is_unreachable_by_the_deadline():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts (the kernel does) and never answers

    async def main(url: str) -> None:
        server = AsyncServer([url], timeout=0.2)
        try:
            await server.request("POST", "/silent", json={}, deadline=time.monotonic() + 0.8)
        finally:
            await server.close()

    try:
        with pytest.raises(Unreachable, match="TimeoutError"):
            asyncio.run(main(f"http://127.0.0.1:{listener.getsockname()[1]}"))
    finally:
        listener.close()
