"""The agent's peer endpoint (sendfile) and the fetch that copies from it (hashed on
the way in, written past the page cache where the filesystem allows)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent import transfer
from corral.agent.objects import ObjectStore
from corral.agent.peer import PeerServer

GOOD = "good-token"
SIZE = 3 * transfer.CHUNK + 12_345  # whole chunks, then a tail that is not 4 KiB aligned


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[str, ObjectStore, str, bytes]]:
    """A peer server on loopback holding one object; tokens other than GOOD are refused."""
    store = ObjectStore(tmp_path / "src")
    data = os.urandom(SIZE)
    src = tmp_path / "blob"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        sha, _ = store.add_from_fd(fd)
    finally:
        os.close(fd)
    asked: list[tuple[str, str | None]] = []

    async def verify(sha256: str, token: str, recipient: str | None) -> str | None:
        asked.append((sha256, recipient))
        return None if token == GOOD else "no such grant"

    loop = asyncio.new_event_loop()
    server = PeerServer(store, verify, "127.0.0.1", 0)
    serving = loop.create_task(server.serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}", store, sha, data
    finally:
        loop.call_soon_threadsafe(server.stop)
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(serving, 5), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _get(url: str, path: str, headers: dict[str, str], method: str = "GET"):
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_the_peer_endpoint_serves_an_object_only_for_a_token_the_server_accepts(peer):
    url, _store, sha, data = peer
    status, _, body = _get(url, f"/objects/{sha}", {})
    assert status == 401 and "missing" in json.loads(body)["error"]
    status, _, body = _get(url, f"/objects/{sha}", {transfer.PEER_TOKEN_HEADER: "bad"})
    assert status == 403 and json.loads(body)["error"] == "no such grant"
    status, headers, body = _get(url, f"/objects/{sha}", {transfer.PEER_TOKEN_HEADER: GOOD})
    assert status == 200 and body == data
    assert headers["content-length"] == str(SIZE)
    status, headers, body = _get(
        url, f"/objects/{sha}", {transfer.PEER_TOKEN_HEADER: GOOD}, method="HEAD"
    )
    assert status == 200 and body == b"" and headers["content-length"] == str(SIZE)
    status, _, body = _get(url, f"/objects/{'0' * 64}", {transfer.PEER_TOKEN_HEADER: GOOD})
    assert status == 404 and json.loads(body)["error"] == "not held here"
    # nothing but a store name is a path into the store
    status, _, _ = _get(url, "/objects/..%2F..%2Fetc%2Fpasswd", {transfer.PEER_TOKEN_HEADER: GOOD})
    assert status == 404
    status, _, body = _get(url, "/health", {})
    assert status == 200 and json.loads(body) == {"ok": True}


def test_the_peer_endpoint_answers_a_malformed_request_with_400(peer):
    url, *_ = peer
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("direct", [False, True])
def test_a_fetch_stores_exactly_the_bytes_whose_sha256_was_ordered(peer, tmp_path, direct):
    url, _store, sha, data = peer
    dst = ObjectStore(tmp_path / f"dst-{direct}")
    path = transfer.fetch(
        dst, sha, SIZE, [f"{url}/objects/{sha}"], GOOD, recipient="i-1", direct=direct
    )
    assert path == dst.path(sha) and path.read_bytes() == data
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    # bytes that do not hash to what was ordered are refused, and nothing is left behind
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(transfer.TransferError, match="sha256"):
        transfer.fetch(dst, wrong, SIZE, [f"{url}/objects/{sha}"], GOOD, direct=direct)
    assert not dst.has(wrong)
    assert [p.name for p in dst.root.iterdir()] == [sha]


def test_a_copy_opens_its_source_while_the_one_before_it_still_streams(tmp_path):
    """Replication copies stream `slots` at a time, and the next ones open their source
    meanwhile (the request, the peer's check with the server, the answer's head): a
    drain's copies follow one another without a gap. A source whose body is held back
    half-way: the next copy's request reaches its source before that body ends."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from corral.agent import executors
    from corral.agent.state import TransferDone
    from corral.api import Fetch
    from corral.testing import wait_for

    blobs = [os.urandom(2 * transfer.CHUNK + 7) for _ in range(2)]
    first, second = (hashlib.sha256(b).hexdigest() for b in blobs)
    by_sha = dict(zip((first, second), blobs, strict=True))
    requested: list[str] = []
    release = threading.Event()

    class Source(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            sha = self.path.rsplit("/", 1)[-1]
            requested.append(sha)
            body = by_sha[sha]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: transfer.CHUNK])
            self.wfile.flush()
            if sha == first:  # the rest once the test saw the next copy's request
                release.wait(30)
            self.wfile.write(body[transfer.CHUNK :])

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Source)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/objects"
    store = ObjectStore(tmp_path / "dst")

    async def main() -> list[object]:
        slots, ahead = asyncio.Semaphore(1), asyncio.Semaphore(1)
        copies = [
            asyncio.create_task(
                executors.fetch(
                    store,
                    Fetch(
                        sha256=sha,
                        size=len(by_sha[sha]),
                        name=sha,
                        sources=[f"{url}/{sha}"],
                        token=GOOD,
                    ),
                    "i-1",
                    slots,
                    ahead,
                )
            )
            for sha in (first, second)
        ]
        try:
            await asyncio.to_thread(
                wait_for, lambda: second in requested, 10, "the second copy's request"
            )
            assert not copies[0].done()  # the first copy still streams
        finally:
            release.set()
        return list(await asyncio.gather(*copies))

    try:
        assert asyncio.run(main()) == [TransferDone(first), TransferDone(second)]
    finally:
        release.set()
        srv.shutdown()
    assert store.path(first).read_bytes() == blobs[0]
    assert store.path(second).read_bytes() == blobs[1]
