"""HTTP to the servers, for the agent (async) and the runner (sync).

Requests go to one server; on a connection error or a 5xx the next server is tried,
with exponential backoff, until the caller's deadline. Every request the agent and
runner make is idempotent, so retrying is always safe.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import httpx

from corral.domain.backoff import Backoff

RETRY = Backoff(base=0.2, factor=2.0, maximum=5.0, jitter=0.5)
_RETRY_STATUSES = {500, 502, 503, 504}


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

    def retry(self, deadline: float | None) -> "_Retry":
        return _Retry(self, deadline)


class _Retry:
    """One request's retries: classify a response, and after a failure move to the
    next server and say how long to wait (or give up at the deadline)."""

    def __init__(self, upstream: Upstream, deadline: float | None):
        self.upstream = upstream
        self.deadline = deadline
        self.failures = 0

    @staticmethod
    def retryable(resp: httpx.Response) -> bool:
        return resp.status_code in _RETRY_STATUSES

    def failed(self, error: str) -> float:
        self.failures += 1
        self.upstream._index = (self.upstream._index + 1) % len(self.upstream.urls)
        delay = RETRY.delay(self.failures, random.random())
        if self.deadline is not None and time.monotonic() + delay > self.deadline:
            raise Unreachable(error)
        return delay


def _describe(exc: httpx.TransportError) -> str:
    return f"{exc.__class__.__name__}: {exc}"


class SyncServer:
    def __init__(self, urls: list[str], headers: dict[str, str], timeout: float = 30.0):
        self.upstream = Upstream(urls)
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def request(
        self, method: str, path: str, *, json: object = None, deadline: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> httpx.Response:
        retry = self.upstream.retry(deadline)
        while True:
            try:
                resp = self.client.request(method, self.upstream.current + path, json=json)
                if not retry.retryable(resp):
                    return resp
                delay = retry.failed(f"HTTP {resp.status_code}")
            except httpx.TransportError as exc:
                delay = retry.failed(_describe(exc))
            if stop is not None and stop():
                raise Unreachable("stopped")
            time.sleep(delay)

    def close(self) -> None:
        self.client.close()


class AsyncServer:
    def __init__(self, urls: list[str], headers: dict[str, str] | None = None,
                 timeout: float = 30.0):
        self.upstream = Upstream(urls)
        self.client = httpx.AsyncClient(headers=headers or {}, timeout=timeout)

    async def request(
        self, method: str, path: str, *, json: object = None, deadline: float | None = None,
        timeout: float | None = None, headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        retry = self.upstream.retry(deadline)
        extra = {"timeout": timeout} if timeout is not None else {}
        while True:
            try:
                resp = await self.client.request(
                    method, self.upstream.current + path, json=json, headers=headers, **extra
                )
                if not retry.retryable(resp):
                    return resp
                delay = retry.failed(f"HTTP {resp.status_code}")
            except httpx.TransportError as exc:
                delay = retry.failed(_describe(exc))
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self.client.aclose()
