"""Move objects: fetch one from whoever holds it, verified by sha256 on the way in,
or upload one to a durable store through a URL the server signed for it.

Sources are peer URLs (another agent's /objects/SHA256, or a server's staged upload);
each is tried in turn with the one-time token the server issued for this transfer.
Standard-library HTTP, so the runner (which fetches a job's inputs) starts fast.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import io
import mmap
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from corral.agent.objects import ObjectStore
from corral.agent.tls import context

PEER_TOKEN_HEADER = "X-Corral-Peer-Token"
PEER_RECIPIENT_HEADER = "X-Corral-Peer-Recipient"  # the instance the token was issued to
CHUNK = 1024 * 1024
ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and the buffer


class TransferError(Exception):
    pass


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, blocksize=CHUNK, context=context()
        )
    else:
        conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=timeout, blocksize=CHUNK
        )
    return conn, parts.path + (f"?{parts.query}" if parts.query else "")


def _get(
    url: str, token: str | None, timeout: float, recipient: str | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn, path = _connect(url, timeout)
    headers = {PEER_TOKEN_HEADER: token} if token else {}
    if token and recipient:
        headers[PEER_RECIPIENT_HEADER] = recipient
    conn.request("GET", path, headers=headers)
    return conn, conn.getresponse()


def upload(
    store: ObjectStore,
    sha256: str,
    size: int,
    url: str,
    headers: dict[str, str],
    timeout: float = 60.0,
) -> None:
    """PUT an object held here to `url` (a signed durable-store URL), streamed from disk."""
    path = store.path(sha256)
    if not store.has(sha256):
        raise TransferError(f"object {sha256[:12]}… is not held here")
    if path.stat().st_size != size:
        raise TransferError(
            f"object {sha256[:12]}… is {path.stat().st_size} bytes here, not {size}"
        )
    where = urllib.parse.urlsplit(url).netloc
    try:
        conn, target = _connect(url, timeout)
        try:
            with open(path, "rb") as f:
                conn.request(
                    "PUT", target, body=f, headers={**headers, "Content-Length": str(size)}
                )
                resp = conn.getresponse()
                detail = resp.read(500).decode(errors="replace")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise TransferError(f"uploading to {where}: {exc}") from None
    if resp.status not in (200, 201, 204):
        raise TransferError(f"uploading to {where}: HTTP {resp.status} {detail[:300]}")


def _receive(
    resp: http.client.HTTPResponse,
    f: io.FileIO,
    h: hashlib._Hash,
    size: int | None,
    url: str,
    direct: bool,
) -> int:
    """Copy the body into `f`, hashing it on the way; returns its length. One buffer
    (page-aligned), filled and written a CHUNK at a time. With `direct`, the full
    chunks go to disk with O_DIRECT when the filesystem takes it: a drain's replica is
    cold data, and writing it through the page cache costs a page allocation per 4 KiB
    (most of a copy's CPU on a fresh VM) and evicts what the jobs there use. The tail
    (and any filesystem that refuses O_DIRECT) is written as usual."""
    fd = f.fileno()
    direct = direct and _set_direct(fd, True)
    buf = mmap.mmap(-1, CHUNK)
    view = memoryview(buf)
    got = filled = offset = 0
    try:
        while n := resp.readinto(view[filled:]):
            got += n
            if size is not None and got > size:
                raise TransferError(f"{url}: more than the expected {size} bytes")
            h.update(view[filled : filled + n])
            filled += n
            if filled == CHUNK:
                direct = _write(fd, view, offset, direct)
                offset += CHUNK
                filled = 0
        if filled:
            whole = filled - filled % ALIGN
            if whole:
                direct = _write(fd, view[:whole], offset, direct)
            if direct:
                _set_direct(fd, False)
            _write(fd, view[whole:filled], offset + whole, False)
        return got
    finally:
        view.release()
        buf.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False if the filesystem does not have it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


def _write(fd: int, data: memoryview, offset: int, direct: bool) -> bool:
    """Write all of `data` at `offset`; returns whether O_DIRECT is still on (a direct
    write the filesystem refuses, or leaves unaligned, is finished the usual way)."""
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            direct = _set_direct(fd, False)
            continue
        if direct and done % ALIGN:
            direct = _set_direct(fd, False)
    return direct


@dataclass
class Opened:
    """A source that answered 200: its body not read yet (`receive` reads it)."""

    url: str
    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    rest: list[str]  # the sources after it, tried if its body turns out wrong
    errors: list[str]  # what the sources before it answered

    def close(self) -> None:
        self.conn.close()


def open_source(
    sources: list[str],
    token: str | None,
    timeout: float = 60.0,
    recipient: str | None = None,
    errors: list[str] | None = None,
) -> Opened:
    """Ask each source in turn until one answers 200 (a peer answers once the server
    confirmed the token), without reading the body. A replication order's copy opens
    its source while earlier copies still stream (executors.fetch): the request, the
    peer's question to the server and the answer's head are no gap between copies."""
    errors = list(errors or [])
    for k, url in enumerate(sources):
        try:
            conn, resp = _get(url, token, timeout, recipient)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{url}: {exc}")
            continue
        if resp.status == 200:
            return Opened(url, conn, resp, sources[k + 1 :], errors)
        try:
            errors.append(f"{url}: HTTP {resp.status} {resp.read(300).decode(errors='replace')}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{url}: HTTP {resp.status} ({exc})")
        finally:
            conn.close()
    raise TransferError("; ".join(errors) or "no source holds it")


def receive(
    store: ObjectStore,
    sha256: str,
    size: int | None,
    opened: Opened,
    token: str | None,
    timeout: float = 60.0,
    recipient: str | None = None,
    direct: bool = False,
) -> Path:
    """Read an opened source's body into `store`, verified by sha256; if its bytes are
    wrong (or it breaks off), the sources after it are tried as `fetch` would."""
    while True:
        url = opened.url
        tmp = store.temp()
        try:
            try:
                h = hashlib.sha256()
                with open(tmp, "wb", buffering=0) as f:
                    got = _receive(opened.resp, f, h, size, url, direct)
            finally:
                opened.close()
            if size is not None and got != size:
                raise TransferError(f"{url}: short body, {got} of {size} bytes")
            if h.hexdigest() != sha256:
                raise TransferError(f"{url}: sha256 {h.hexdigest()[:12]}… is not {sha256[:12]}…")
            return store.accept(tmp, sha256)
        except (OSError, http.client.HTTPException, TransferError) as exc:
            error = str(exc) if isinstance(exc, TransferError) else f"{url}: {exc}"
        finally:
            tmp.unlink(missing_ok=True)
        opened = open_source(opened.rest, token, timeout, recipient, [*opened.errors, error])


def fetch(
    store: ObjectStore,
    sha256: str,
    size: int | None,
    sources: list[str],
    token: str | None,
    timeout: float = 60.0,
    recipient: str | None = None,
    direct: bool = False,
) -> Path:
    """The object in `store`, fetched if it is not there yet. `recipient`: this
    instance's id (a token works once, for the instance it was issued to). `direct`:
    write it past the page cache where the filesystem allows (a replica is cold data:
    see `_receive`)."""
    if store.has(sha256):
        return store.path(sha256)
    opened = open_source(sources, token, timeout, recipient)
    return receive(store, sha256, size, opened, token, timeout, recipient, direct)
