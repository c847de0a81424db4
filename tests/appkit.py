"""In-process API test helpers: one way to talk to a server context's app without a
socket (httpx's ASGI transport runs no lifespan, so no background loop runs), and one
way to join an agent through the real register route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from corral.server.app import create_app


def client(ctx: Any, name: str = "srv") -> httpx.AsyncClient:
    """An HTTP client wired straight to `ctx`'s app."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(ctx)), base_url=f"http://{name}"
    )


@dataclass
class Joined:
    reg: dict  # the register route's reply
    headers: dict[str, str]  # the agent's own credential
    beat: dict  # the smallest heartbeat body: who it is

    @property
    def instance_id(self) -> str:
        return self.reg["instance_id"]


async def join(
    http: httpx.AsyncClient, ctx: Any, name: str, *, cpus: float = 4, memory_mb: int = 1024
) -> Joined:
    """Register an agent `name` with the server's join token."""
    r = await http.post(
        "/api/v1/agents/register",
        json={"name": name, "cpus": cpus, "memory_mb": memory_mb},
        headers={"Authorization": f"Bearer {ctx.join_token}"},
    )
    assert r.status_code == 200, r.text
    reg = r.json()
    return Joined(
        reg,
        {"Authorization": f"Bearer {reg['credential']}"},
        {"instance_id": reg["instance_id"], "incarnation": reg["incarnation"]},
    )
