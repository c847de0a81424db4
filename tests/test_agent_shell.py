"""The agent daemon is the I/O shell of its state machine (issue 13): a real Agent,
in this process, against a real server. Every runner it starts or kills is an
instruction `AgentState` gave, and a machine that withholds a start leaves the job
unstarted, however often the server orders it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from corral.agent.daemon import Agent, AgentConfig
from corral.agent.state import (
    AgentState,
    Event,
    Exit,
    HeartbeatReplied,
    Instruction,
    KillAttempt,
    StartAttempt,
    Stop,
)
from corral.testing import Cluster, wait_for

pytestmark = pytest.mark.e2e


class WithholdsStarts(AgentState):
    """The real machine, except that it never says start."""

    def handle(self, event: Event, now: float) -> list[Instruction]:
        return [i for i in super().handle(event, now) if not isinstance(i, StartAttempt)]


class InProcess:
    """A real Agent run on an event loop in a thread of the test process."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.loop: asyncio.AbstractEventLoop | None = None
        self.code: int | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            self.started.set()
            return await self.agent.run()

        self.code = asyncio.run(main())

    def stop(self) -> int | None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.agent.stop)
        self.thread.join(timeout=60)
        return self.code

    def journal(self) -> list[tuple[Event, tuple[Instruction, ...]]]:
        return list(self.agent.journal)  # deque appends are atomic; a copy to read


@contextmanager
def in_process_agent(
    cluster: Cluster, server, name: str, state: AgentState | None = None
) -> Iterator[tuple[InProcess, list[tuple[str, int, tuple]]]]:
    """The agent, and the supervisor calls it made (each with how many journal
    entries there were when it was made)."""
    config = AgentConfig(
        servers=[server.url],
        data_dir=Path(cluster.base) / "agents" / name,
        name=name,
        join_token=server.join_token,
        cpus=2,
        memory_mb=2048,
    )
    config.data_dir.mkdir(parents=True)
    agent = Agent(config, state)
    calls: list[tuple[str, int, tuple]] = []
    sup = agent.supervisor
    real_start, real_kill = sup.start, sup.kill

    def start(order):
        calls.append(("start", len(agent.journal), (order.job_id, order.attempt, order.token)))
        return real_start(order)

    def kill(job_id, attempt, reason):
        token = sup.tracked[(job_id, attempt)].token if (job_id, attempt) in sup.tracked else None
        calls.append(("kill", len(agent.journal), (job_id, attempt, token)))
        return real_kill(job_id, attempt, reason)

    sup.start, sup.kill = start, kill  # type: ignore[method-assign]
    run = InProcess(agent)
    run.thread.start()
    run.started.wait(30)
    try:
        yield run, calls
    finally:
        run.stop()


def _ordered(journal, job_id: int) -> int:
    """How many heartbeat replies ordered a start of `job_id`."""
    return sum(
        1
        for event, _ in journal
        if isinstance(event, HeartbeatReplied)
        and any(s.job_id == job_id for s in event.reply.start)
    )


def _replies(journal) -> int:
    return sum(1 for event, _ in journal if isinstance(event, HeartbeatReplied))


def test_a_start_the_machine_withholds_never_happens(cluster):
    server = cluster.server()
    client = cluster.client(server)
    with in_process_agent(cluster, server, "shell1", WithholdsStarts()) as (run, calls):
        cluster.wait_agents_running(client, 1)
        job = client.submit(["sleep", "1"], cpus=1)
        wait_for(lambda: _ordered(run.journal(), job.id) >= 1, 60, "the server to order a start")
        seen = _replies(run.journal())
        # the daemon answers more heartbeats; none of them starts the job on its own
        wait_for(lambda: _replies(run.journal()) >= seen + 3, 60, "three more heartbeat replies")
        assert [c for c in calls if c[0] == "start"] == []
        assert run.agent.supervisor.tracked == {}
        assert client.job(job.id).state not in ("running", "succeeded")
    assert run.code == 0


def test_every_runner_started_or_killed_was_the_machines_instruction(cluster):
    server = cluster.server()
    client = cluster.client(server)
    with in_process_agent(cluster, server, "shell2") as (run, calls):
        cluster.wait_agents_running(client, 1)
        done = client.submit(["true"], cpus=1)
        wait_for(lambda: client.job(done.id).state == "succeeded", 60, "the job to succeed")
        long = client.submit(["sleep", "300"], cpus=1)
        wait_for(lambda: client.job(long.id).state == "running", 60, "the long job to run")
        client.cancel(long.id)
        wait_for(lambda: any(c[0] == "kill" for c in calls), 60, "the cancelled job's kill")
        wait_for(lambda: run.agent.supervisor.tracked == {}, 60, "no runner left")
        # each forgotten attempt's directory went with it (the succeeded one's and the
        # killed one's, whatever their runners left in them)
        assert list(run.agent.supervisor.attempts_dir.iterdir()) == []
    assert run.code == 0
    journal = run.journal()
    assert {c[2][0] for c in calls if c[0] == "start"} == {done.id, long.id}
    for what, seen, (job_id, attempt, token) in calls:
        given = [i for _, out in journal[:seen] for i in out]
        if what == "start":
            ok = any(
                isinstance(i, StartAttempt)
                and (i.order.job_id, i.order.attempt, i.order.token) == (job_id, attempt, token)
                for i in given
            )
        else:
            ok = any(
                isinstance(i, KillAttempt)
                and (i.job_id, i.attempt, i.token) == (job_id, attempt, token)
                for i in given
            )
        assert ok, f"the daemon did {what} {job_id}/{attempt} without the machine saying so"
    # stopping is the machine's decision too: Stop in, Exit(0) out
    stop = [out for event, out in journal if isinstance(event, Stop)]
    assert stop and isinstance(stop[0][-1], Exit) and stop[0][-1].code == 0


def test_an_attempt_stays_tracked_until_its_directory_is_gone(tmp_path, monkeypatch):
    """Whoever sees an attempt no longer tracked (another thread of the agent, the test
    above) must find its directory gone: the directory goes first."""
    from corral.agent import supervisor as supervisor_module
    from corral.agent.supervisor import Supervisor, Tracked

    sup = Supervisor(tmp_path / "agent", ["http://127.0.0.1:9"], zygote=False)
    d = sup.attempts_dir / "7-1"
    d.mkdir()
    (d / "spec.json").write_text("{}")
    sup.tracked[(7, 1)] = Tracked(7, 1, "t", d)
    seen: list[bool] = []
    removing = supervisor_module.remove_known_dir

    def remove(top, files=(), subdirs=()):
        seen.append((7, 1) in sup.tracked)
        removing(top, files, subdirs)

    monkeypatch.setattr(supervisor_module, "remove_known_dir", remove)
    sup.forget(7, 1)
    assert seen == [True]
    assert sup.tracked == {} and not d.exists()
