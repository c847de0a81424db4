"""The request path stays on the event loop: FastAPI runs a plain `def` endpoint or
dependency in a worker thread, one hand-off there and back per call, on every request.
On two cores that costs more than most endpoints' own work."""

from __future__ import annotations

import inspect
import types

from fastapi.routing import APIRoute

from corral.server.app import create_app
from corral.server.routes import flat_routes


def _callables(dependant, where: str):
    if dependant.call is not None:
        yield dependant.call, where
    for sub in dependant.dependencies:
        yield from _callables(sub, where)


def test_every_endpoint_and_dependency_is_a_coroutine():
    ctx = types.SimpleNamespace(config=types.SimpleNamespace(build_version="t"), server_id="s")
    app = create_app(ctx)
    routes = [r for r in flat_routes(app) if isinstance(r, APIRoute)]
    assert len(routes) > 40  # the whole API was walked
    sync = sorted(
        {
            f"{fn.__module__}.{fn.__qualname__} (on {where})"
            for route in routes
            for fn, where in _callables(route.dependant, f"{sorted(route.methods)} {route.path}")
            if not inspect.iscoroutinefunction(fn)
        }
    )
    assert not sync, "run in a worker thread per request:\n" + "\n".join(sync)
