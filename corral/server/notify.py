"""In-process wake-ups, so long-polls and loops react at once instead of on a timer.

Waiters remember a generation before they look at the database and wait only if
nothing was signalled since, so a wake-up between the look and the wait is never lost.
Across servers (PostgreSQL) waiters also re-check on a short timer.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Hashable


class Notifier:
    def __init__(self) -> None:
        self._gen: dict[Hashable, int] = defaultdict(int)
        self._events: dict[Hashable, asyncio.Event] = {}

    def generation(self, key: Hashable) -> int:
        return self._gen[key]

    def wake(self, *keys: Hashable) -> None:
        for key in keys:
            self._gen[key] += 1
            ev = self._events.pop(key, None)
            if ev is not None:
                ev.set()

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
