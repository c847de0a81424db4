"""Admission under load: agent exchanges that would queue too long are refused at once
with 503 and a Retry-After, instead of waiting for a database connection until they
time out (the pool's 500s, agents declared lost, registrations that never finish).

A gate lets `slots` exchanges use the database at once and more wait for a slot,
while the wait they can expect (those ahead × an exchange's smoothed time / slots)
stays under `max_wait` seconds, and never more than `queue` of them; the next is
refused, told to come back when the backlog it saw should be gone. Exchanges
already admitted (a long-poll woken to look again) wait, never refused.

Registrations go first (`urgent`): a free slot goes to a waiting registration before
any waiting heartbeat, and a registration's expected wait counts only the
registrations ahead of it. A registration is a few statements; until it is done its
agent can do nothing at all, while a heartbeat kept waiting (or refused) still keeps
its agent alive (corral.server.api.agents.refused_alive), so a registration storm no
longer queues behind the exchanges of the agents already in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator

RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 30
# The advice is stretched by a random share up to this: refused exchanges are already
# told one after another (LoadGate._refuse) and agents add up to half again of what
# they are told (corral.agent.upstream), so a stretch of up to 100% on top left a
# server idle while a storm of registrations waited out their advice (1,000 at once
# on PostgreSQL: all in 48 s at 31% server CPU with 100%, 38-40 s with 20%).
STRETCH = 0.2


class Overloaded(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"server busy: retry after {retry_after} s")
        self.retry_after = retry_after


def retry_after(backlog: int, slots: int, mean_s: float, u: float) -> int:
    """Whole seconds until a backlog of `backlog` exchanges, `slots` at a time and
    `mean_s` each, should be gone, stretched by up to STRETCH (`u` in [0, 1)) so the
    refused do not all come back at once."""
    drain = backlog * mean_s / max(1, slots)
    return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(drain * (1 + STRETCH * u))))


class LoadGate:
    def __init__(
        self,
        slots: int,
        queue: int,
        max_wait: float = float("inf"),
        max_age: float | None = None,
        urgent_max_wait: float | None = None,
    ):
        if slots < 1 or queue < 0 or max_wait < 0 or (max_age is not None and max_age < 0):
            raise ValueError(
                "a load gate needs slots >= 1, queue >= 0, max_wait >= 0 and max_age >= 0"
            )
        self.slots = slots
        self.queue = queue
        self.max_wait = max_wait
        # how long an exchange may already have waited in the server before it got here
        # (the event loop itself behind): then its client may have given up
        self.max_age = max_wait if max_age is None else max_age
        # a registration may expect to wait longer: until it is in, its agent can do
        # nothing, and a storm of them is served fastest from a queue (refused, they
        # come back to find the heartbeats of those already in ahead of them)
        self.urgent_max_wait = max_wait if urgent_max_wait is None else urgent_max_wait
        self._free = slots
        # waiters for a slot: registrations (urgent) are served before the rest
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()
        self.busy = 0
        self.waiting = 0
        self.waiting_urgent = 0
        self.mean_s = 0.02  # an exchange's time in the gate, smoothed
        self.refused = 0
        # when the exchanges refused so far, each told to come back after the one
        # refused before it, will all have been served (a queue in time, holding nothing)
        self._told_until = 0.0
        self.clock = time.monotonic

    def check(self, age: float = 0.0, *, urgent: bool = False) -> None:
        """Raise Overloaded if an exchange arriving now would be refused: also one that
        has already waited `age` > max_age seconds since the server received it (the
        event loop itself is behind; its client may have given up). An urgent one (a
        registration) counts only the urgent ones ahead of it."""
        if age > self.max_age:
            self.refused += 1
            raise Overloaded(retry_after(1, 1, age, random.random()))
        ahead = self.waiting_urgent if urgent else self.waiting
        limit = self.urgent_max_wait if urgent else self.max_wait
        if self.busy >= self.slots and (
            ahead >= self.queue or (ahead + 1) * self.mean_s / self.slots > limit
        ):
            raise self._refuse(self.busy + ahead + 1)

    def _refuse(self, backlog: int) -> Overloaded:
        """Told to come back once the backlog it saw and every exchange refused before
        it (and told to come back meanwhile) should have been served: refused ones then
        return about as fast as the gate serves, not all at once."""
        self.refused += 1
        now = self.clock()
        each = self.mean_s / self.slots
        told_before = max(0.0, self._told_until - now) / each if each > 0 else 0.0
        self._told_until = max(self._told_until, now) + each
        return Overloaded(
            retry_after(backlog + math.ceil(told_before), self.slots, self.mean_s, random.random())
        )

    async def _acquire(self, urgent: bool) -> None:
        if self._free > 0 and not self._urgent and (urgent or not self._normal):
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = self._urgent if urgent else self._normal
        line.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed a slot as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    line.remove(fut)
            raise

    def _release(self) -> None:
        for line in (self._urgent, self._normal):
            while line:
                fut = line.popleft()
                if not fut.done():
                    fut.set_result(None)  # the slot passes straight to it
                    return
        self._free += 1

    @contextlib.asynccontextmanager
    async def enter(self, *, refuse: bool = True, urgent: bool = False) -> AsyncIterator[None]:
        if refuse:
            self.check(urgent=urgent)
        self.waiting += 1
        self.waiting_urgent += urgent
        try:
            await self._acquire(urgent)
        finally:
            self.waiting -= 1
            self.waiting_urgent -= urgent
        self.busy += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.busy -= 1
            self._release()
            self.mean_s += 0.1 * (time.perf_counter() - t0 - self.mean_s)
