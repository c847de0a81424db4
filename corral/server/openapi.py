"""The OpenAPI document lists the error responses each route really returns, all in
the one JSON error shape ({"error": {"code", "message", "fields"?}}):

- 401/403 on routes that need a bearer token (and 401 on the runner routes, whose
  attempt token is checked before the body is read);
- 404 where a path names something that may not exist, and on writes (they name
  jobs, instances, fleets, rollouts);
- 409 on writes (a stale attempt token, an illegal transition, a name in use);
- 413 on routes that take a body (the body guard's per-route limit);
- 422 where there is any input to validate;
- 503 everywhere: the database did not answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from corral.server import auth, lease_route
from corral.server.api import health
from corral.server.routes import flat_routes

ERROR_SCHEMA = {
    "title": "ErrorBody",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "fields": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}

DESCRIPTIONS = {
    401: "Missing, unknown or revoked credential",
    403: "This credential may not do this",
    404: "Not found",
    409: "Conflict: stale attempt token, illegal transition or a name in use",
    413: "Request body over this route's limit",
    422: "Invalid input; the message names the field",
    503: "The database (or every holder of an object) is unavailable; try again",
}

BEARER = {auth.require_admin, auth.require_agent, auth.require_joiner, health.require_observer}
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _calls(dependant: Any) -> set:
    out = {dependant.call} if dependant.call else set()
    for d in dependant.dependencies:
        out |= _calls(d)
    return out


def _has_input(dependant: Any) -> bool:
    if dependant.path_params or dependant.query_params or dependant.header_params:
        return True
    if dependant.body_params or dependant.cookie_params:
        return True
    return any(_has_input(d) for d in dependant.dependencies)


def error_codes(route: APIRoute) -> set[int]:
    calls = _calls(route.dependant)
    writes = bool(set(route.methods or ()) & WRITES)
    codes = {503}
    if calls & BEARER:
        codes |= {401, 403}
    if auth.attempt_token in calls:
        codes |= {401, 404, 409}
    if route.dependant.path_params or writes:
        codes.add(404)
    if writes:
        codes |= {401, 409, 413}
    if _has_input(route.dependant) or writes or (route.openapi_extra or {}).get("requestBody"):
        codes.add(422)
    return codes


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = ERROR_SCHEMA
        ref = {"$ref": "#/components/schemas/ErrorBody"}
        for route in flat_routes(app):
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            ops = schema["paths"].get(route.path_format, {})
            for method in route.methods or ():
                op = ops.get(method.lower())
                if op is None:
                    continue
                responses = op.setdefault("responses", {})
                for code in sorted(error_codes(route)):
                    responses[str(code)] = {
                        "description": DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": ref}},
                    }
        schema["paths"][lease_route.PATH] = lease_route.OPENAPI  # served before the framework
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
