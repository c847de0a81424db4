"""What an instance provider (a backend: local processes, SSH hosts, a cloud) must do.

It lives here, as a pure interface, so the server can hold providers without importing
any of them: `corral.backends` implements it, the composition root (`corral up`,
`corral server`) plugs implementations in. Everything else about an instance goes
through its agent."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Backend(ABC):
    name: str

    @abstractmethod
    async def create(
        self,
        instance_id: str,
        name: str,
        fleet: str,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
    ) -> str:
        """Start a machine (of this many cpus and MB, if given) whose agent will register
        as `name`; return a reference."""

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
    ) -> None:
        """Make sure the machine of a live instance is up (after a restart of the server)."""

    @abstractmethod
    async def terminate(self, ref: str) -> None:
        """Destroy the machine. Called only for retired instances (or forced)."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release what the backend holds when the server stops."""
