"""The body guard: an ASGI middleware in front of every route.

- A request that carries a body is authenticated *before* a byte of the body is read:
  a bearer token the database knows (users, agents, joiners), or, on the attempt routes,
  an attempt token issued for that job's attempt. Anything else gets 401 at once and the
  body is never read (an anonymous 200 MB POST costs the server nothing).
- Each route has a body limit (JSON routes 1 MiB unless the route says more; uploads
  stream to disk under their own larger limit). A declared Content-Length over the limit
  gets 413 before the body is read; a body without one is counted while it streams and
  gets 413 as soon as it passes the limit.

Routes state their needs with the decorators below (set on the endpoint function).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.server import metrics
from corral.server.errors import error_body
from corral.server.loadgate import Overloaded
from corral.server.routes import flat_routes, match
from corral.store import jobs as jobs_repo
from corral.store import tokens
from corral.store.db import DatabaseError

MiB = 2**20
DEFAULT_BODY_LIMIT = 1 * MiB
LIMIT_ATTR = "__corral_body_limit__"
AUTH_ATTR = "__corral_body_auth__"
SHED_ATTR = "__corral_shed__"
ATTEMPT_TOKEN_HEADER = "x-corral-attempt-token"
SCOPE_TOKEN_ROW = "corral.token_row"  # (secret, row) checked by the guard, reused by auth
INT64_MAX = 2**63 - 1

BEARER = "bearer"
ATTEMPT = "attempt"
PUBLIC = "public"
DASHBOARD_COOKIE = "corral_token"  # corral.server.dashboard.COOKIE
PUBLIC_FORM_LIMIT = 8 * 1024

F = Callable[..., Any]


def body_limit(limit: int) -> Callable[[F], F]:
    """This route accepts bodies up to `limit` bytes (default: 1 MiB)."""

    def mark(fn: F) -> F:
        setattr(fn, LIMIT_ATTR, limit)
        return fn

    return mark


def shed_under_load(fn: F) -> F:
    """Refuse this route with 503 and Retry-After, before anything else, while the
    agent gate is full (corral.server.loadgate)."""
    setattr(fn, SHED_ATTR, True)
    return fn


def attempt_body(fn: F) -> F:
    """This route's body is authenticated by the attempt token (runner routes)."""
    setattr(fn, AUTH_ATTR, ATTEMPT)
    return fn


def public_form(fn: F) -> F:
    """Anyone may send this route a small form (the sign-in form, which checks the token
    it carries itself): not authenticated, capped at PUBLIC_FORM_LIMIT."""
    setattr(fn, AUTH_ATTR, PUBLIC)
    setattr(fn, LIMIT_ATTR, PUBLIC_FORM_LIMIT)
    return fn


def _cookie(headers: dict[str, str], name: str) -> str:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except CookieError:
        return ""
    morsel = jar.get(name)
    return morsel.value if morsel is not None else ""


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body streams (an HTTPException: FastAPI passes it on as is and
    the error handlers answer 413 in the JSON shape)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: this route accepts at most {limit} bytes")
        self.limit = limit


def too_large_body(limit: int) -> dict:
    return error_body(
        "too_large", f"request body too large: this route accepts at most {limit} bytes"
    )


async def send_json(send: Send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


SCOPE_RECEIVED = "corral.received"
MATCHES_KEPT = 1024  # (path, method) -> route matches the guard remembers


def _route_name(endpoint: Any) -> str:
    """`attempts.finish`, `agents.heartbeat`, ...: the metric label of a route."""
    if endpoint is None:
        return "unmatched"
    module = getattr(endpoint, "__module__", "") or ""
    return f"{module.rsplit('.', 1)[-1]}.{getattr(endpoint, '__name__', '?')}"


class BodyGuard:
    def __init__(self, app: ASGIApp, routes_app: Any) -> None:
        self.app = app
        self.routes_app = routes_app  # the FastAPI app: its routes and state.ctx
        self._routes: list | None = None
        self._matched: dict[tuple[str, str], tuple[Any, dict, Any]] = {}

    def _endpoint(self, scope: Scope) -> tuple[Any, dict, Any]:
        """The route's endpoint, its path parameters and its request counter."""
        if self._routes is None:  # the app is complete by its first request
            self._routes = flat_routes(self.routes_app)
        key = (scope["path"], scope["method"])
        found = self._matched.get(key)
        if found is None:
            # every route's pattern tried in turn: remembered for the paths requested
            # again and again (an agent's heartbeat and relay); the routes never change
            endpoint, params, _ = match(self._routes, *key)
            if len(self._matched) >= MATCHES_KEPT:
                self._matched.clear()
            counter = metrics.HTTP_REQUESTS.labels(_route_name(endpoint))
            found = self._matched[key] = (endpoint, params, counter)
        return found

    async def _denial(
        self, scope: Scope, headers: dict[str, str], endpoint: Any, params: dict
    ) -> tuple[int, dict] | None:
        """Why this body may not be read (status, error body), or None."""
        ctx = self.routes_app.state.ctx
        mode = getattr(endpoint, AUTH_ATTR, BEARER)
        if mode == PUBLIC:
            return None
        try:
            if mode == ATTEMPT:
                token = headers.get(ATTEMPT_TOKEN_HEADER, "")
                try:
                    job_id, number = int(params["job_id"]), int(params["number"])
                except (KeyError, TypeError, ValueError):
                    return None  # the route's own validation answers (422)
                if not (0 <= job_id <= INT64_MAX and 0 <= number <= INT64_MAX):
                    return None
                if token and ctx.issued_tokens.known(job_id, number, token):
                    return None  # seen passing a fence or this check before (issued.py)
                if token and await ctx.db.query_one(
                    jobs_repo.attempt_token_issued, job_id, number, token
                ):
                    ctx.issued_tokens.add(job_id, number, token)
                    return None
                return 401, error_body(
                    "unauthorized",
                    f"missing or unknown {ATTEMPT_TOKEN_HEADER} for attempt {number} "
                    f"of job {job_id}",
                )
            scheme, _, secret = headers.get("authorization", "").partition(" ")
            secret = secret.strip()
            if "authorization" not in headers:  # the dashboard's forms carry its cookie
                scheme, secret = "bearer", _cookie(headers, DASHBOARD_COOKIE)
            if scheme.lower() != "bearer" or not secret:
                return 401, error_body(
                    "unauthorized", "missing bearer token (Authorization: Bearer ...)"
                )
            row = await ctx.db.query_one(tokens.lookup, secret)
            if row is None:  # the same words as the route's own check (auth.py)
                return 401, error_body(
                    "unauthorized", await ctx.db.query(tokens.why_refused, secret)
                )
        except (DatabaseError, OSError) as exc:
            return 503, error_body(
                "database_unavailable",
                f"the database is unavailable ({exc.__class__.__name__}); try again",
            )
        scope[SCOPE_TOKEN_ROW] = (secret, row)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[SCOPE_RECEIVED] = time.monotonic()  # how long it queued here (loadgate.py)
        headers = _headers(scope)
        endpoint, params, requests = self._endpoint(scope)
        requests.inc()
        limit: int = getattr(endpoint, LIMIT_ATTR, DEFAULT_BODY_LIMIT)
        declared = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        try:
            declared_size = int(declared) if declared is not None else None
        except ValueError:
            declared_size = None  # the HTTP server refuses such a request itself
        if getattr(endpoint, SHED_ATTR, False):
            try:  # before the credential's lookup: a refusal costs no database work
                self.routes_app.state.ctx.gate().check()
            except Overloaded as exc:
                metrics.AGENT_REFUSED.inc()
                retry = [(b"retry-after", str(exc.retry_after).encode())]
                body = error_body("overloaded", f"{exc}: too many agent exchanges waiting")
                await send_json(send, 503, body, [*retry, (b"connection", b"close")])
                return
        if chunked or (declared_size or 0) > 0:
            denial = await self._denial(scope, headers, endpoint, params)
            if denial is not None:
                status, body = denial
                extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
                await send_json(send, status, body, [*extra, (b"connection", b"close")])
                return
            if declared_size is not None and declared_size > limit:
                await send_json(send, 413, too_large_body(limit), [(b"connection", b"close")])
                return

        started = False
        seen = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:
            if started:
                raise
            await send_json(send, 413, too_large_body(exc.limit), [(b"connection", b"close")])
