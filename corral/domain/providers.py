"""What an instance provider (a backend: local processes, SSH hosts, a cloud) must do.

It lives here, as a pure interface, so the server can hold providers without importing
any of them: `corral.backends` implements it, the composition root (`corral up`,
`corral server`) plugs implementations in. Everything else about an instance goes
through its agent.

A backend reports back only through return values and exceptions: `create` returns
the machine's reference or raises `corral.domain.provisioning.ProvisionError` (the
server records the failure, backs off and retries), and `progress` lets it say which
step it is at. The server records events and instance fields; a backend writes nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

Progress = Callable[[str], Awaitable[None]]


class Backend(ABC):
    name: str

    def slots(self, fleet: str, spec: Mapping[str, Any]) -> list[str] | None:
        """The machines a fleet may use, as references, when they form a fixed pool
        (a fleet's SSH hosts): the server puts each new instance on a free one. None
        when the backend makes machines on demand."""
        return None

    @abstractmethod
    async def create(
        self,
        instance_id: str,
        name: str,
        fleet: str,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
        ref: str | None = None,
        spec: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Start a machine (of this many cpus and MB, if given; on the pool machine
        `ref`, if the backend has slots) whose agent will register as `name`; return
        its reference. Idempotent: called again for the same instance after a failure.
        `spec` is the fleet's stored settings."""

    @abstractmethod
    async def ensure(
        self,
        instance_id: str,
        name: str,
        fleet: str,
        ref: str | None,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        """Make sure the machine of a live instance is up (after a restart of the server)."""

    @abstractmethod
    async def terminate(
        self, ref: str, *, name: str | None = None, spec: Mapping[str, Any] | None = None
    ) -> None:
        """Destroy the machine of instance `name` (or, for a pool machine, stop its
        agent and give the machine back). Called only for retired instances (or forced).
        Raises ProvisionError (or any error) when it could not: the server retries."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release what the backend holds when the server stops."""
