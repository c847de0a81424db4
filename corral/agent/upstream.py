"""HTTP to the servers with failover: the retry policy shared by the agent and the
runner, and the runner's small synchronous client.

Requests go to one server; on a connection error or a 5xx the next server is tried,
with exponential backoff, until the caller's deadline. Every request the agent and
runner make is idempotent, so retrying is always safe.

The runner's client is built on the standard library's http.client on purpose: a
runner process starts for every job attempt, and importing httpx would triple its
start-up time. The agent (one long-lived process) uses httpx (upstream_async.py).
"""

from __future__ import annotations

import http.client
import json as jsonlib
import random
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.domain.backoff import Backoff, after_retry_after

RETRY = Backoff(base=0.2, factor=2.0, maximum=5.0, jitter=0.5)
RETRY_STATUSES = frozenset({500, 502, 503, 504})


class Unreachable(Exception):
    """No server answered before the deadline."""


class Upstream:
    """The list of servers and which one is in use."""

    def __init__(self, urls: list[str]):
        if not urls:
            raise ValueError("at least one server URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self._index = 0

    @property
    def current(self) -> str:
        return self.urls[self._index]

    def retry(self, deadline: float | None) -> Retry:
        return Retry(self, deadline)


class Retry:
    """One request's retries: after a failure, move to the next server and say how
    long to wait, or give up (Unreachable) when the deadline would pass."""

    def __init__(self, upstream: Upstream, deadline: float | None):
        self.upstream = upstream
        self.deadline = deadline
        self.failures = 0

    def failed(self, error: str, retry_after: float | None = None) -> float:
        """`retry_after`: what the server asked (503 Retry-After); waited at least."""
        self.failures += 1
        self.upstream._index = (self.upstream._index + 1) % len(self.upstream.urls)
        delay = RETRY.delay(self.failures, random.random())
        if retry_after is not None:
            delay = max(delay, after_retry_after(retry_after, random.random()))
        if self.deadline is not None and time.monotonic() + delay > self.deadline:
            raise Unreachable(error)
        return delay


RETRY_AFTER_MAX = 300.0


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (the form corral servers
    send), capped at RETRY_AFTER_MAX; None if absent or not a number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, RETRY_AFTER_MAX)


@dataclass
class Response:
    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self):
        return jsonlib.loads(self.content)


class SyncServer:
    """Keep-alive JSON requests over http.client, with failover and retries."""

    def __init__(self, urls: list[str], headers: dict[str, str], timeout: float = 30.0):
        self.upstream = Upstream(urls)
        self.headers = {"Content-Type": "application/json", **headers}
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._conn_url: str | None = None

    def _connection(self) -> http.client.HTTPConnection:
        url = self.upstream.current
        if self._conn is None or self._conn_url != url:
            self.close()
            parts = urllib.parse.urlsplit(url)
            if parts.scheme == "https":
                from corral.agent import tls

                self._conn = http.client.HTTPSConnection(
                    parts.hostname or "", parts.port, timeout=self.timeout, context=tls.context()
                )
            else:
                self._conn = http.client.HTTPConnection(
                    parts.hostname or "", parts.port, timeout=self.timeout
                )
            self._conn_url = url
        return self._conn

    def _once(self, method: str, path: str, body: bytes | None) -> Response:
        conn = self._connection()
        prefix = urllib.parse.urlsplit(self.upstream.current).path
        try:
            conn.request(method, prefix + path, body=body, headers=self.headers)
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            return Response(resp.status, resp.read(), headers)
        except (OSError, http.client.HTTPException):
            self.close()  # a broken keep-alive connection is not reused
            raise

    def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        deadline: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Response:
        body = None if json is None else jsonlib.dumps(json).encode()
        retry = self.upstream.retry(deadline)
        while True:
            try:
                resp = self._once(method, path, body)
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                delay = retry.failed(
                    f"HTTP {resp.status_code}", retry_after(resp.headers.get("retry-after"))
                )
            except (OSError, http.client.HTTPException) as exc:
                delay = retry.failed(f"{exc.__class__.__name__}: {exc}")
            if stop is not None and stop():
                raise Unreachable("stopped")
            time.sleep(delay)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
