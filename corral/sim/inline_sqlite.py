"""SQLite in the simulator's own thread.

aiosqlite runs every statement on a worker thread and hands the result back through
the event loop; under the simulator, where nothing else runs concurrently, that round
trip is most of the wall time (and on a loaded machine each hop waits for a time
slice). `inline()` makes aiosqlite run each queued call at once in the calling thread
for the duration of a run: the same SQL on the same SQLite file, without the hops,
and without a thread whose timing could differ between two runs of one seed. The
server's single-writer lock (`Database._write_lock`) already serialises writers, so a
statement never waits on another connection while it holds the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import aiosqlite.core


class _RunAtOnce:
    """Stands in for a connection's work queue: runs each call when it is queued."""

    def put_nowait(self, item: tuple[Any, Any]) -> None:
        future, fn = item
        try:
            result = fn()
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


@contextlib.contextmanager
def inline() -> Iterator[None]:
    cls = aiosqlite.core.Connection
    saved_init, saved_await = cls.__init__, cls.__await__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        saved_init(self, *args, **kwargs)
        self._tx = _RunAtOnce()

    def __await__(self: Any) -> Any:
        return self._connect().__await__()  # no worker thread to start

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__await__ = __await__  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.__init__ = saved_init  # type: ignore[method-assign]
        cls.__await__ = saved_await  # type: ignore[method-assign]
