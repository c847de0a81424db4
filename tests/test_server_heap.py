"""A server takes what start-up built out of the cyclic collector's reach before it
answers its first request: every full collection traversed all of it while requests
waited (up to 133 ms, eight times in 40 s, at 500 agents; benchmarks/agents.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from pathlib import Path

from corral.server.config import ServerConfig
from corral.server.main import serve


def test_start_up_objects_are_frozen_before_the_server_is_ready(tmp_path: Path) -> None:
    async def main() -> int:
        ready = asyncio.Event()
        seen: list[int] = []

        def on_ready(_ctx) -> None:
            seen.append(gc.get_freeze_count())
            ready.set()

        config = ServerConfig(data_dir=tmp_path / "srv", host="127.0.0.1", port=0)
        task = asyncio.create_task(serve(config, on_ready=on_ready))
        try:
            await asyncio.wait_for(ready.wait(), 60)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return seen[0]

    gc.unfreeze()  # whatever this test process froze before, if anything
    try:
        frozen = asyncio.run(main())
    finally:
        gc.unfreeze()
    # the modules, routes, schemas and tables a server holds for its whole life
    assert frozen > 50_000, frozen
