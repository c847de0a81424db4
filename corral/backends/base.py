"""What a backend must do. Everything else about an instance goes through its agent."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Backend(ABC):
    name: str

    @abstractmethod
    async def create(self, instance_id: str, name: str, fleet: str, *,
                     cpus: float | None = None, memory_mb: int | None = None) -> str:
        """Start a machine (of this many cpus and MB, if given) whose agent will register
        as `name`; return a reference."""

    @abstractmethod
    async def ensure(self, instance_id: str, name: str, fleet: str, ref: str | None, *,
                     cpus: float | None = None, memory_mb: int | None = None) -> None:
        """Make sure the machine of a live instance is up (after a restart of the server)."""

    @abstractmethod
    async def terminate(self, ref: str) -> None:
        """Destroy the machine. Called only for retired instances (or forced)."""

    async def close(self) -> None:
        """Release what the backend holds when the server stops."""
