"""Every route of the app as one flat list, whatever way this FastAPI version keeps
included routers (newer ones nest them lazily)."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute


def flat_routes(app: Any) -> list[BaseRoute]:
    import fastapi.routing

    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:  # FastAPI before lazily included routers: already flat
        return list(app.routes)
    return [rc.route for rc in contexts(app.routes)]


def match(routes: list[BaseRoute], path: str, method: str) -> tuple[Any, dict[str, str], set[str]]:
    """(the endpoint for `method` on `path` or None, its path parameters, every method
    some route allows on `path`)."""
    endpoint: Any = None
    params: dict[str, str] = {}
    allowed: set[str] = set()
    for route in routes:
        regex = getattr(route, "path_regex", None)
        m = regex.match(path) if regex is not None else None
        if m is None:
            continue
        methods = getattr(route, "methods", None) or set()
        allowed |= methods
        if endpoint is None and method in methods:
            endpoint, params = getattr(route, "endpoint", None), m.groupdict()
    return endpoint, params, allowed
