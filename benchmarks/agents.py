"""Agents at scale: N simulated agents speak the real REST protocol to a real server
(register with the join token, then heartbeat at the interval each reply tells them,
renewing their leases between heartbeats when a reply says to),
a client submits jobs meanwhile, and one agent is silenced to see how long the server
takes to declare it lost. Bounded in time; prints JSON.

    python benchmarks/agents.py --agents 1000 [--db URL] [--servers 2] --duration 120

Simulated agents report what a real agent reports when idle: the components it
has installed (the same each time) and, on its first heartbeat and then once per
`objects_refresh(interval)` as the agent does, the objects it holds (none). By
default heartbeats do not wait (`wait=0`, then sleep the told interval):
the latency measured is the server's work per heartbeat, not a long-poll's hold.
With `--wait S` they long-poll as the agent does (`server_cpu_ms_per_heartbeat` then
includes what the server spends while holding them). Submitted jobs target a fleet
no agent is in, so they stay queued (placement is dispatch.py's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import ssl
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dispatch import percentile
from benchmarks.machine import describe
from benchmarks.pg import throwaway_database
from corral.agent.upstream import retry_after
from corral.domain.backoff import after_retry_after
from corral.domain.heartbeat import objects_refresh
from corral.testing import Cluster


class Stats:
    def __init__(self) -> None:
        self.register: list[float] = []
        self.heartbeat: list[float] = []
        self.renewal: list[float] = []  # lease renewals between exchanges
        self.submit: list[float] = []
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def agent_life(
    k: int,
    http: httpx.AsyncClient,
    urls: list[str],
    join: str,
    stats: Stats,
    stop: float,
    silence: asyncio.Event | None,
    registered: dict[int, str],
    wait: float = 0.0,
) -> None:
    url = urls[k % len(urls)]
    name = f"sim{k:05d}"
    body = {"name": name, "cpus": 4, "memory_mb": 8192, "host": name, "agent_version": "sim"}
    reply = None
    while reply is None and time.monotonic() < stop:
        t = time.perf_counter()
        try:
            r = await http.post(
                url + "/api/v1/agents/register",
                json=body,
                headers={"Authorization": f"Bearer {join}"},
            )
        except httpx.HTTPError as exc:
            stats.error(f"register {type(exc).__name__}")
            await asyncio.sleep(1 + random.random())
            continue
        if r.status_code != 200:
            stats.error(f"register HTTP {r.status_code}")
            await asyncio.sleep(max(asked(r), 1 + random.random()))
            continue
        stats.register.append(time.perf_counter() - t)
        reply = r.json()
    if reply is None:
        return
    registered[k] = reply["instance_id"]
    cred = {"Authorization": f"Bearer {reply['credential']}"}
    beat = {
        "instance_id": reply["instance_id"],
        "incarnation": reply["incarnation"],
        "wait": wait,
        "components": COMPONENTS,
        "objects": [],
    }
    interval = reply["interval"]
    listed_at = time.monotonic()
    lease: dict = {"every": None, "task": None}
    exchange_now = asyncio.Event()  # a renewal was refused: exchange at once
    if reply.get("lease_interval"):  # renew from the registration on, as the agent does
        lease["every"] = beat["renews_every"] = reply["lease_interval"]
        lease["task"] = asyncio.create_task(
            renewals(url, cred, beat, lease["every"], stats, stop, silence, exchange_now)
        )
    await asyncio.sleep(random.random() * interval)  # agents do not start in step
    try:
        while time.monotonic() < stop:
            if silence is not None and silence.is_set():
                return  # the silenced agent: no more heartbeats or renewals
            t = time.perf_counter()
            try:
                r = await http.post(url + "/api/v1/agents/heartbeat", json=beat, headers=cred)
                if r.status_code == 200:
                    stats.heartbeat.append(time.perf_counter() - t)
                    answer = r.json()
                    interval = answer["interval"]
                    if beat["objects"] is not None:
                        listed_at = time.monotonic()
                    # unchanged since the last list; the whole list again (a refresh,
                    # as the agent sends it) once objects_refresh has passed
                    due = time.monotonic() - listed_at >= objects_refresh(interval)
                    beat["objects"] = [] if due else None
                    every = answer.get("lease_interval")
                    beat["renews_every"] = every
                    if every != lease["every"]:
                        if lease["task"] is not None:
                            lease["task"].cancel()
                        lease["every"] = every
                        lease["task"] = every and asyncio.create_task(
                            renewals(url, cred, beat, every, stats, stop, silence, exchange_now)
                        )
                else:
                    stats.error(f"heartbeat HTTP {r.status_code}")
                    await asyncio.sleep(max(asked(r), 0.2 + random.random()))  # as the agent
                    continue
            except httpx.HTTPError as exc:
                stats.error(f"heartbeat {type(exc).__name__}")
                await asyncio.sleep(0.2 + random.random())
                continue
            if not wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(exchange_now.wait(), interval)
                exchange_now.clear()
    finally:
        if lease["task"] is not None:
            lease["task"].cancel()


class RawRenewer:
    """One keep-alive connection renewing one agent's lease. The generator shares two
    cores with the server and its database: httpx costs about a millisecond of client
    CPU per request, which at hundreds of renewals a second starved the simulated
    agents (their renewals queued in this process, not at the server); a bodiless
    request and its short answer need no more than this."""

    def __init__(self, url: str, cred: dict, incarnation: int) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.request = (
            f"POST /api/v1/agents/lease HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: {cred['Authorization']}\r\n"
            f"X-Corral-Incarnation: {incarnation}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def renew(self) -> int:
        """The answer's status; raises OSError when the connection fails. A kept
        connection the server closed meanwhile (its keep-alive timeout) is opened again
        once, as an HTTP client's pool does."""
        if self.conn is not None:
            try:
                return await self._once()
            except OSError:
                pass  # closed while idle: a new connection below
        self.conn = await asyncio.open_connection(self.host, self.port)
        return await self._once()

    async def _once(self) -> int:
        assert self.conn is not None
        reader, writer = self.conn
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":", 1)[1]))
                if line.lower() == b"connection: close":
                    self.close()
            return status
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.close()
            raise OSError(str(exc)) from exc

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def renewals(
    url: str,
    cred: dict,
    beat: dict,
    every: float,
    stats: Stats,
    stop: float,
    silence: asyncio.Event | None,
    exchange_now: asyncio.Event,
) -> None:
    """Renew the lease between exchanges, as the agent does when told to."""
    renewer = RawRenewer(url, cred, beat["incarnation"])
    try:
        while time.monotonic() < stop:
            await asyncio.sleep(every)
            if silence is not None and silence.is_set():
                return
            t = time.perf_counter()
            try:
                status = await renewer.renew()
            except OSError as exc:
                stats.error(f"renewal {type(exc).__name__}")
                continue
            if status in (204, 409):
                stats.renewal.append(time.perf_counter() - t)
            else:
                stats.error(f"renewal HTTP {status}")
            if status != 204:  # 409: renewed or not, the server wants an exchange first
                exchange_now.set()
    finally:
        renewer.close()


def asked(r: httpx.Response) -> float:
    """How long the agent waits when answered this: the server's Retry-After (0 if
    none) plus the agent's random share of it (corral.agent.upstream)."""
    return after_retry_after(retry_after(r.headers.get("retry-after")) or 0.0, random.random())


COMPONENTS = [  # what an idle agent reports each heartbeat
    {"name": "runner", "version": "1.0.0", "sha256": "a" * 64},
    {"name": "agent", "version": "1.0.0", "sha256": "b" * 64},
]


async def submitter(
    http: httpx.AsyncClient, urls: list[str], admin: str, stats: Stats, stop: float
) -> None:
    job = {"command": ["true"], "fleet": "nowhere"}
    k = 0
    while time.monotonic() < stop:
        t = time.perf_counter()
        try:
            r = await http.post(
                urls[k % len(urls)] + "/api/v1/jobs",
                json=job,
                headers={"Authorization": f"Bearer {admin}"},
            )
            if r.status_code == 201:
                stats.submit.append(time.perf_counter() - t)
            else:
                stats.error(f"submit HTTP {r.status_code}")
        except httpx.HTTPError as exc:
            stats.error(f"submit {type(exc).__name__}")
        k += 1
        await asyncio.sleep(0.5)


async def lost_instances(http: httpx.AsyncClient, url: str, admin: str) -> set[str]:
    r = await http.get(url + "/api/v1/instances", headers={"Authorization": f"Bearer {admin}"})
    r.raise_for_status()
    return {i["id"] for i in r.json() if i["lost"]}


async def batched_heartbeats(http: httpx.AsyncClient, urls: list[str], admin: str) -> int | None:
    """Heartbeats the servers answered with a batched lease renewal (no exchange),
    from their /metrics; None when the servers do not count them."""
    total, seen = 0.0, False
    for url in urls:
        try:
            r = await http.get(url + "/metrics", headers={"Authorization": f"Bearer {admin}"})
        except httpx.HTTPError:
            return None
        for line in r.text.splitlines():
            if line.startswith("corral_heartbeats_batched_total "):
                total += float(line.split()[1])
                seen = True
    return int(total) if seen else None


async def drive(args, urls: list[str], join: str, admin: str, server_pids: list[int]) -> dict:
    stats = Stats()
    # A real agent has a client and a connection of its own: by default so does each
    # simulated one. (One client shared by hundreds of agents, with a pool as large,
    # spent seconds of this process's time managing that pool in bursts, measured as
    # server latency; with --connections N the agents share one pool of N connections
    # and the wait for one is measured.) The submitter and the watcher share another.
    shared = None
    tls = ssl.create_default_context()
    if args.connections:
        limits = httpx.Limits(max_connections=args.connections)
        shared = httpx.AsyncClient(limits=limits, timeout=args.request_timeout)

    async def life(k: int, *rest) -> None:
        if shared is not None:
            await agent_life(k, shared, *rest)
            return
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # one certificate store for all (loading one per client costs milliseconds)
        async with httpx.AsyncClient(limits=one, timeout=args.request_timeout, verify=tls) as own:
            await agent_life(k, own, *rest)

    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        t0 = time.monotonic()
        stop = t0 + args.register_timeout + args.duration
        silence = asyncio.Event()
        registered: dict[int, str] = {}
        tasks = [
            asyncio.create_task(
                life(
                    k,
                    urls,
                    join,
                    stats,
                    stop,
                    silence if k == 0 else None,
                    registered,
                    args.wait,
                )
            )
            for k in range(args.agents)
        ]
        # registration phase: until all are in or the timeout (a poll: it is a benchmark)
        while len(registered) < args.agents and time.monotonic() < t0 + args.register_timeout:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        register_s = time.monotonic() - t0
        stop = time.monotonic() + args.duration  # the agents run on past this; harmless
        procs = [psutil.Process(p) for p in server_pids]
        cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        me = psutil.Process()
        me0 = me.cpu_times().user + me.cpu_times().system
        w0 = time.monotonic()
        sub = asyncio.create_task(submitter(http, urls, admin, stats, stop))
        heartbeats_before = len(stats.heartbeat)
        renewals_before = len(stats.renewal)
        batched_before = await batched_heartbeats(http, urls, admin)
        await asyncio.sleep(min(5.0, args.duration / 4))
        silenced = registered.get(0)  # agent 0's instance: its task stops heartbeating
        silence.set()
        t_silence = time.monotonic()
        detect_s = None
        false_lost: set[str] = set()
        rss = 0.0
        while time.monotonic() < stop:
            await asyncio.sleep(1.0)
            rss = max(rss, sum(p.memory_info().rss for p in procs) / 2**20)
            try:
                lost = await lost_instances(http, urls[0], admin)
            except httpx.HTTPError:
                stats.error("instances list")
                continue
            if silenced in lost and detect_s is None:
                detect_s = time.monotonic() - t_silence
            false_lost |= lost - {silenced}
        cpu1 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        me1 = me.cpu_times().user + me.cpu_times().system
        beats = len(stats.heartbeat) - heartbeats_before
        renewed = len(stats.renewal) - renewals_before
        batched_after = await batched_heartbeats(http, urls, admin)
        batched = (
            batched_after - batched_before
            if batched_after is not None and batched_before is not None
            else None
        )
        wall = time.monotonic() - w0
        await sub
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if shared is not None:
            await shared.aclose()
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 1) if xs else None  # noqa: E731
    return {
        "agents_registered": len(registered),
        "register_s": round(register_s, 1),
        "register_p99_ms": ms(stats.register, 99),
        "heartbeat_p50_ms": ms(stats.heartbeat, 50),
        "heartbeat_p99_ms": ms(stats.heartbeat, 99),
        # after every agent registered: the steady state, without the registration
        # storm's first exchanges
        "heartbeat_steady_p50_ms": ms(stats.heartbeat[heartbeats_before:], 50),
        "heartbeat_steady_p99_ms": ms(stats.heartbeat[heartbeats_before:], 99),
        "heartbeats_per_s": round(beats / wall, 1),
        # of those, answered with a batched lease renewal only (corral/server/leases.py)
        "heartbeats_batched_pct": round(100 * batched / beats, 1) if batched and beats else batched,
        "submit_p99_ms": ms(stats.submit, 99),
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
        "server_cpu_ms_per_heartbeat": round(1000 * (cpu1 - cpu0) / beats, 2) if beats else None,
        # lease renewals between exchanges (told to agents whose exchanges come rarer)
        "renewals_per_s": round(renewed / wall, 1),
        "renewal_p99_ms": ms(stats.renewal, 99),
        # all the server's CPU over every liveness signal (exchanges and renewals)
        "server_cpu_ms_per_signal": (
            round(1000 * (cpu1 - cpu0) / (beats + renewed), 3) if beats + renewed else None
        ),
        "server_rss_mb": round(rss, 1),
        # this generator's own CPU: near 100 it, not the server, is what queues
        "generator_cpu_pct": round(100 * (me1 - me0) / wall, 1),
        "false_lost": len(false_lost),
        "detect_s": round(detect_s, 1) if detect_s is not None else None,
        "errors": stats.errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--duration", type=float, default=90, help="steady-state seconds")
    ap.add_argument("--register-timeout", type=float, default=180)
    ap.add_argument("--db", default=None, help="PostgreSQL server URL (throwaway database)")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument(
        "--connections",
        type=int,
        default=0,
        help="agents share one client with this many connections "
        "(0: a client of its own each, as real agents have)",
    )
    ap.add_argument("--request-timeout", type=float, default=30)
    ap.add_argument("--wait", type=float, default=0.0, help="long-poll each heartbeat this long")
    args = ap.parse_args()
    if args.servers > 1 and not args.db:
        raise SystemExit("--servers 2 needs --db")
    machine = describe()
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(throwaway_database(args.db)) if args.db else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-agents-"))
        c = stack.enter_context(Cluster(Path(tmp)))
        servers = [c.server(db_url=db_url, fast=False) for _ in range(args.servers)]
        result = asyncio.run(
            drive(
                args,
                [s.url for s in servers],
                servers[0].join_token,
                servers[0].admin_token,
                [s.pid for s in servers],
            )
        )
    print(
        json.dumps(
            {
                "benchmark": "agents",
                "database": "postgresql" if args.db else "sqlite",
                "servers": args.servers,
                "agents": args.agents,
                "duration_s": args.duration,
                "wait_s": args.wait,
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                **result,
                "machine": machine,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
