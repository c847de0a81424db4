"""Attempts just started whose start reports are still on their way through the relay.

When a heartbeat's reply starts attempts, the agent's next exchange would go out at
once, while the new runners are still taking their job locks: the server then handles
that exchange (the agent's whole observed state, a write transaction) ahead of their
start reports, and each job's start waits for it (traced on an idle fleet: 5-10 ms of
the 20-25 ms from submit to start). So the next exchange first waits, at most WAIT
after the latest start, until the relay has sent those start reports. Nothing depends
on it: a runner that reports directly, or never, only costs the exchange that wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

WAIT = 0.05  # seconds an exchange waits, at most, after the latest start


class StartReports:
    def __init__(self, wait: float = WAIT, clock: Callable[[], float] = time.monotonic):
        self.wait = wait
        self.clock = clock
        self.pending: dict[tuple[int, int], float] = {}  # (job, attempt): when started
        self._changed = asyncio.Event()

    def started(self, job_id: int, attempt: int) -> None:
        self.pending[(job_id, attempt)] = self.clock()

    def relayed(self, reports: Iterable[dict]) -> None:
        """The relay sent these reports (answered or not): starts among them are out."""
        for r in reports:
            job_id, attempt = r.get("job_id"), r.get("attempt")
            if r.get("action") == "start" and isinstance(job_id, int) and isinstance(attempt, int):
                self.pending.pop((job_id, attempt), None)
        self._changed.set()

    async def settled(self) -> None:
        """Return once no start report is pending, or WAIT after the latest start."""
        if not self.pending:
            return
        deadline = max(self.pending.values()) + self.wait
        while self.pending and (left := deadline - self.clock()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        self.pending.clear()  # not reported through the relay in time: not waited for again
