"""The server's event loop: uvloop's where it is installed.

A server spends much of its CPU in the event loop's own work around each socket
(reading, writing, scheduling callbacks); uvloop does that work in C (libuv).
`corral[server]` installs it on Linux and macOS; elsewhere asyncio's own loop runs the
same code. The agent stays on asyncio's loop: its peer endpoint sends objects with
`loop.sendfile`, which uvloop does not implement, and the agent's CPU per job did not
change on uvloop (measured side by side)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, or None (asyncio's default) where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on the loop `loop_factory` names."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
