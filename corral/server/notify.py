"""In-process wake-ups, so long-polls and loops react at once instead of on a timer.

Waiters remember a generation before they look at the database and wait only if
nothing was signalled since, so a wake-up between the look and the wait is never lost.
Across servers (PostgreSQL) the keys long-polls wait on (tuples: an instance, a job)
are also published (`publish`, see corral.store.wakebus) and other servers' are
applied with `wake_local`; while that channel is down (`cross_server` False) waiters
re-check the database on a short timer instead (ServerContext.recheck). Loop keys
(plain strings: "dispatch", "drain", ...) stay local: the server that made the change
runs its own loop, and every server's loops still run on their own timers.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Hashable


class Notifier:
    def __init__(self) -> None:
        self._gen: dict[Hashable, int] = defaultdict(int)
        self._events: dict[Hashable, asyncio.Event] = {}
        self.publish: Callable[[tuple[Hashable, ...]], None] | None = None
        self.cross_server = False  # other servers' wake-ups reach this one now

    def generation(self, key: Hashable) -> int:
        return self._gen[key]

    def wake(self, *keys: Hashable) -> None:
        self.wake_local(*keys)
        if self.publish is not None:
            shared = tuple(k for k in keys if isinstance(k, tuple))
            if shared:
                self.publish(shared)

    def wake_local(self, *keys: Hashable) -> None:
        for key in keys:
            self._gen[key] += 1
            ev = self._events.pop(key, None)
            if ev is not None:
                ev.set()

    def wake_all(self) -> None:
        """Every waiter looks again (after wake-ups may have been missed)."""
        self.wake_local(*list(self._events))

    def set_cross_server(self, up: bool) -> None:
        was, self.cross_server = self.cross_server, up
        if up and not was:
            self.wake_all()

    async def wait(self, key: Hashable, since: int, timeout: float) -> bool:
        """Wait until `key` is woken after generation `since`; False on timeout."""
        if self._gen[key] != since:
            return True
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        try:
            await asyncio.wait_for(ev.wait(), timeout=max(0.0, timeout))
            return True
        except TimeoutError:
            return self._gen[key] != since
