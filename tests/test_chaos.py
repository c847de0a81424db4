"""Chaos: 200+ jobs, 3 agents, 2 servers on one PostgreSQL, and seeded faults —
runners SIGKILLed, agents SIGKILLed and restarted, agents frozen past the grace
period (their heartbeats delayed), one server SIGKILLed mid-run.

Afterwards: every job is final; none was recorded as completed twice; every job's
recorded result came from its final attempt; no job used more than max_attempts;
no runner or command process is left behind.

A failing seed replays with  CORRAL_CHAOS_SEEDS=<seed> pytest tests/test_chaos.py
(CORRAL_CHAOS_JOBS changes the job count).
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from corral.testing import Cluster, job_python, wait_for

pytestmark = pytest.mark.e2e

SEEDS = [int(s) for s in os.environ.get("CORRAL_CHAOS_SEEDS", "7").split(",") if s]
JOBS = int(os.environ.get("CORRAL_CHAOS_JOBS", "200"))
MAX_ATTEMPTS = 4
FINAL = {"succeeded", "failed", "cancelled"}

# Sleep a while, say which attempt this is, exit 0 (even job ids) or 10+attempt (odd).
JOB = textwrap.dedent("""
    import os, sys, time
    job, n = int(os.environ["CORRAL_JOB_ID"]), int(os.environ["CORRAL_ATTEMPT"])
    time.sleep(float(sys.argv[1]))
    print(f"job {job} attempt {n}", flush=True)
    sys.exit(0 if job % 2 == 0 else 10 + n)
""")


class Chaos:
    """Injects faults from a seeded schedule until told to stop. Runner kills are
    instant; a killed or frozen agent recovers on a timer while other faults go on
    (at most two agents are down or frozen at once)."""

    def __init__(self, rng: random.Random, cluster: Cluster, victim_server, grace: float):
        self.rng = rng
        self.cluster = cluster
        self.victim_server = victim_server
        self.grace = grace
        self.stop = threading.Event()
        self.log: list[str] = []
        self.server_killed = False
        self.error: BaseException | None = None
        self.faulted: set[str] = set()
        self.recoveries: list[threading.Timer] = []
        self.lock = threading.Lock()

    def runner_pids(self) -> list[int]:
        pids = []
        for agent in self.cluster.agents:
            for f in sorted((agent.data_dir / "attempts").glob("*/runner.pid")):
                try:
                    pids.append(json.loads(f.read_text())["pid"])
                except (OSError, ValueError, KeyError):
                    continue
        return pids

    def later(self, delay: float, agent, fn) -> None:
        def recover() -> None:
            with self.lock:
                fn()
                self.faulted.discard(agent.name)

        t = threading.Timer(delay, recover)
        self.recoveries.append(t)
        t.start()

    def act(self, progress: float) -> None:
        rng = self.rng
        if not self.server_killed and progress >= 0.3:
            self.victim_server.kill()
            self.server_killed = True
            self.log.append(f"SIGKILL server {self.victim_server.url}")
            return
        action = rng.choice(["runner", "runner", "runner", "agent_kill", "agent_freeze"])
        agent = rng.choice(self.cluster.agents)
        if action == "runner":
            pids = self.runner_pids()
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.log.append(f"SIGKILL runner {pid}")
                except ProcessLookupError:
                    pass
            return
        with self.lock:
            if agent.name in self.faulted or len(self.faulted) >= 2:
                return
            self.faulted.add(agent.name)
            if action == "agent_kill":
                agent.kill()
                self.log.append(f"SIGKILL agent {agent.name}")
                self.later(rng.uniform(0.2, 3.0), agent, agent.start)
            else:
                agent.signal(signal.SIGSTOP)
                self.log.append(f"SIGSTOP agent {agent.name} (heartbeats delayed)")
                self.later(
                    self.grace + rng.uniform(1.0, 4.0), agent, lambda: agent.signal(signal.SIGCONT)
                )

    def run(self, progress) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.3, 0.9)):
                self.act(progress())
        except BaseException as exc:
            self.error = exc
        finally:
            for t in self.recoveries:  # recover everything at once, never leave one down
                t.cancel()
            with self.lock:
                for agent in self.cluster.agents:
                    agent.signal(signal.SIGCONT)
                    if not agent.alive():
                        agent.start()
                self.faulted.clear()


@pytest.mark.postgres
@pytest.mark.parametrize("seed", SEEDS)
def test_chaos(seed: int, pg_url: str, tmp_path: Path, jobfiles: Path):
    rng = random.Random(seed)
    script = jobfiles / "job.py"
    script.write_text(JOB)
    with Cluster(tmp_path / "cluster") as cluster:
        s1 = cluster.server(db_url=pg_url, name="s1")
        s2 = cluster.server(db_url=pg_url, name="s2")
        orders = [[s1, s2], [s2, s1], [s2, s1]]
        for k, servers in enumerate(orders):
            cluster.agent(servers, name=f"a{k + 1}", cpus=4)
        client = cluster.client(s1)
        cluster.wait_agents_running(client, 3)

        ids = [
            client.submit(
                [job_python(), str(script), f"{rng.uniform(0.1, 1.5):.2f}"],
                max_attempts=MAX_ATTEMPTS,
                cpus=1,
            ).id
            for _ in range(JOBS)
        ]
        done = {"n": 0}

        def progress() -> float:
            return done["n"] / JOBS

        chaos = Chaos(rng, cluster, s2, grace=4.0)
        thread = threading.Thread(target=chaos.run, args=(progress,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                active = client.jobs(states=["queued", "locked", "running"], limit=JOBS)
                done["n"] = JOBS - len(active)
                if not active:
                    break
                time.sleep(0.5)
        finally:
            chaos.stop.set()
            thread.join(timeout=30)
        context = f"seed {seed}; faults: " + "; ".join(chaos.log)
        assert chaos.error is None, f"{chaos.error!r}; {context}"
        assert chaos.server_killed, context
        assert done["n"] == JOBS, f"jobs still active after 600s; {context}"

        jobs = [client.job(i) for i in ids]
        for j in jobs:
            where = f"job {j.id} ({context})"
            assert j.state in FINAL, where
            assert len(j.attempts) == j.attempt <= MAX_ATTEMPTS, where
            completed = [a for a in j.attempts if a.state in ("succeeded", "failed")]
            assert len(completed) <= 1, f"recorded as completed twice: {where}"
            if completed:
                (a,) = completed
                # the recorded result is the final attempt's own
                assert a.number == j.result_attempt == j.attempt, where
                assert j.exit_code == a.exit_code, where
                assert j.exit_code == (0 if j.id % 2 == 0 else 10 + a.number), where
                page = client.logs(j.id, attempt=a.number)
                text = b"".join(base64.b64decode(c.data) for c in page.chunks)
                assert text == f"job {j.id} attempt {a.number}\n".encode(), where
            else:
                assert j.state == "failed" and "gave up after" in j.reason, where
                assert j.attempt == MAX_ATTEMPTS and j.result_attempt == j.attempt, where
        # no runner (or the command it ran) outlives its attempt
        wait_for(
            lambda: not cluster.leftovers(), 30, f"no runner or command left behind ({context})"
        )
        succeeded = sum(j.state == "succeeded" for j in jobs)
        print(
            f"\nseed {seed}: {len(chaos.log)} faults, {succeeded} succeeded, "
            f"{sum(j.attempt > 1 for j in jobs)} retried, "
            f"{sum('gave up' in (j.reason or '') for j in jobs)} gave up"
        )
