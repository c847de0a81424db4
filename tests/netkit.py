"""A TCP listener of a test's own, to learn who reached it and from where."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def listener(host: str) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """Listens on host (port chosen by the kernel) until the block ends; yields the port
    and, for each connection accepted, (peer address, the first line it sent or "")."""
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen()
    srv.settimeout(0.2)
    seen: list[tuple[str, str]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.makefile("r").readline().strip()
                except OSError:
                    line = ""
            seen.append((addr[0], line))

    t = threading.Thread(target=accept, name="test-listener", daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        stop.set()
        t.join(5)
        srv.close()
