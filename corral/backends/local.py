"""The local backend: agent processes on this machine, supervised like a small init.

An agent that exits is restarted with backoff, unless it exited with the retired
code or left a tombstone: a retired instance is never brought back. Agents are
started with --exit-with-parent, so even if this process is killed outright no agent
outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.domain.instances import AGENT_EXIT_RETIRED, TOMBSTONE_FILE
from corral.domain.providers import Backend, Progress

log = logging.getLogger("corral.backends.local")


@dataclass
class _Agent:
    name: str
    fleet: str
    data_dir: Path
    cpus: float | None = None
    memory_mb: int | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    retired: bool = False
    terminating: bool = False
    log_file: Path | None = None
    history: list[int] = field(default_factory=list)


def agent_environment() -> dict[str, str]:
    """An agent inherits the server's environment minus its secrets."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("CORRAL_TOKEN", "CORRAL_JOIN_TOKEN") and not k.startswith("AWS_")
    }


class LocalBackend(Backend):
    name = "local"

    def __init__(
        self,
        base_dir: Path,
        *,
        server_urls: list[str] | None = None,
        join_token_file: Path | None = None,
        cpus: float | None = None,
        memory_mb: int | None = None,
        extra_args: list[str] | None = None,
    ):
        self.base_dir = Path(base_dir)
        self.server_urls = server_urls or []
        self.join_token_file = join_token_file
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.extra_args = extra_args or []
        self._agents: dict[str, _Agent] = {}
        self._monitor: asyncio.Task | None = None
        self._closed = False

    # -- Backend ---------------------------------------------------------------------------

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
        agent = self._agents.get(name) or _Agent(
            name, fleet, self.base_dir / "agents" / name, cpus, memory_mb
        )
        self._agents[name] = agent
        self._spawn(agent)
        self._ensure_monitor()
        return f"local:{name}"

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
        agent = self._agents.get(name)
        if agent is None:
            agent = _Agent(name, fleet, self.base_dir / "agents" / name, cpus, memory_mb)
            self._agents[name] = agent
            if (agent.data_dir / TOMBSTONE_FILE).exists():
                agent.retired = True
                return
            self._spawn(agent)
        self._ensure_monitor()

    async def terminate(
        self, ref: str, *, name: str | None = None, spec: Mapping[str, Any] | None = None
    ) -> None:
        name = ref.split(":", 1)[1] if ref.startswith("local:") else ref
        agent = self._agents.get(name)
        if agent is None:
            return
        agent.terminating = True
        await asyncio.to_thread(self._stop, agent, 10.0)
        self._agents.pop(name, None)

    async def close(self) -> None:
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
        agents = list(self._agents.values())
        for a in agents:
            a.terminating = True
        await asyncio.gather(*(asyncio.to_thread(self._stop, a, 15.0) for a in agents))

    # -- inspection (used by tests and `corral up`) -----------------------------------------

    def pid_of(self, name: str) -> int | None:
        agent = self._agents.get(name)
        if agent and agent.proc and agent.proc.poll() is None:
            return agent.proc.pid
        return None

    def restarts_of(self, name: str) -> int:
        agent = self._agents.get(name)
        return agent.restarts if agent else 0

    # -- internals --------------------------------------------------------------------------

    def _command(self, agent: _Agent) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "corral",
            "agent",
            "--data-dir",
            str(agent.data_dir),
            "--name",
            agent.name,
            "--fleet",
            agent.fleet,
            "--exit-with-parent",
        ]
        for url in self.server_urls:
            cmd += ["--server", url]
        if self.join_token_file:  # a 0600 file: never the token on a command line
            cmd += ["--join-token-file", str(self.join_token_file)]
        # the server's own data dir (tokens, database) is none of a job's business
        cmd += ["--hide", str(self.base_dir)]
        cpus = agent.cpus if agent.cpus is not None else self.cpus
        memory = agent.memory_mb if agent.memory_mb is not None else self.memory_mb
        if cpus is not None:
            cmd += ["--cpus", str(cpus)]
        if memory is not None:
            cmd += ["--memory", str(memory)]
        return cmd + self.extra_args

    def _spawn(self, agent: _Agent) -> None:
        if self._closed or (agent.proc is not None and agent.proc.poll() is None):
            return
        agent.data_dir.mkdir(parents=True, exist_ok=True)
        agent.log_file = agent.data_dir / "agent.log"
        with open(agent.log_file, "ab") as out:
            agent.proc = subprocess.Popen(
                self._command(agent),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=agent_environment(),
            )
        log.info("started agent %s (pid %d)", agent.name, agent.proc.pid)

    def _stop(self, agent: _Agent, timeout: float) -> None:
        proc = agent.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for agent in list(self._agents.values()):
                if agent.terminating or agent.retired or agent.proc is None:
                    continue
                code = agent.proc.poll()
                if code is None:
                    continue
                agent.history.append(code)
                if code == AGENT_EXIT_RETIRED or (agent.data_dir / TOMBSTONE_FILE).exists():
                    agent.retired = True
                    log.info("agent %s exited as retired; not restarting", agent.name)
                    continue
                if agent.next_start == 0.0:
                    delay = min(30.0, 0.5 * 2 ** min(agent.restarts, 6))
                    agent.next_start = now + delay
                    log.warning(
                        "agent %s exited with %s; restarting in %.1fs", agent.name, code, delay
                    )
                if now >= agent.next_start:
                    agent.restarts += 1
                    agent.next_start = 0.0
                    self._spawn(agent)
