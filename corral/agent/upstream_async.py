"""The agent's asynchronous HTTP to the servers (httpx), with the shared failover
and retry policy of upstream.py."""

from __future__ import annotations

import asyncio

import httpx

from corral.agent import tls
from corral.agent.upstream import RETRY_STATUSES, Upstream, retry_after


class AsyncServer:
    def __init__(
        self, urls: list[str], headers: dict[str, str] | None = None, timeout: float = 30.0
    ):
        self.upstream = Upstream(urls)
        self.client = httpx.AsyncClient(
            headers=headers or {}, timeout=timeout, verify=tls.context()
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        deadline: float | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        retry = self.upstream.retry(deadline)
        while True:
            try:
                resp = await self.client.request(
                    method,
                    self.upstream.current + path,
                    json=json,
                    headers=headers,
                    timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
                )
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                delay = retry.failed(
                    f"HTTP {resp.status_code}", retry_after(resp.headers.get("retry-after"))
                )
            except httpx.TransportError as exc:
                delay = retry.failed(f"{exc.__class__.__name__}: {exc}")
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self.client.aclose()
