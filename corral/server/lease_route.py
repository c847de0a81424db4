"""`POST /api/v1/agents/lease`: an agent's lease renewal, served before the web framework.

At 10,000 agents a silent one must be found within 15 s, so a server hears a few
thousand renewals a second while it shares two cores with its database: each must cost
a small fraction of a millisecond. Through FastAPI a request costs milliseconds (routing,
dependencies, the body guard's credential lookup, validation), so this route is an ASGI
layer in front of the whole app: no body, no database, no framework. It authenticates
by the sha256 of the bearer credential against what this server's last exchange with
that agent established (`corral.server.leases.Pinger`), and buffers the renewal like a
repeated heartbeat's (`corral.server.leases.renew_by_request`).

Answers: 204 renewed; 409 `exchange_needed` (this server has not admitted the agent, it
is another incarnation, or something woke the instance: the agent runs a full exchange
now, which admits it again); 401 no bearer credential; 400 a bad incarnation header or
a body; 405 another method. A revoked credential stops renewing on the server that
revoked it at once, elsewhere within its admission (five minutes, or three exchange
intervals if longer, after the agent's last exchange there).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.domain.tokens import hash_secret
from corral.server import metrics
from corral.server.errors import error_body
from corral.server.guard import send_json
from corral.server.leases import Renewed, renew_by_request

PATH = "/api/v1/agents/lease"
INCARNATION_HEADER = "X-Corral-Incarnation"
_INCARNATION = INCARNATION_HEADER.lower().encode()
_NO_CONTENT = {"type": "http.response.start", "status": 204, "headers": []}
_EMPTY = {"type": "http.response.body", "body": b""}


def _error(description: str) -> dict:
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


# Its entry in the OpenAPI document (the route is not the framework's: openapi.py adds it)
OPENAPI = {
    "post": {
        "tags": ["agents"],
        "summary": "Renew this agent's lease between heartbeats (no body)",
        "description": "Sent by agents a heartbeat reply told a `lease_interval`, with the "
        "agent's own credential (`Authorization: Bearer ...`). Touches no database.",
        "operationId": "renew_lease",
        "parameters": [
            {
                "name": INCARNATION_HEADER,
                "in": "header",
                "required": True,
                "schema": {"type": "integer"},
                "description": "the incarnation the agent's registration gave it",
            }
        ],
        "responses": {
            "204": {"description": "Renewed"},
            "400": _error("A missing or bad incarnation header, or a body"),
            "401": _error("No bearer credential"),
            "409": _error(
                "Run a full heartbeat exchange first: this server has not admitted this "
                "credential, it is another incarnation, or there is news for the instance"
            ),
        },
    }
}


class LeaseRoute:
    def __init__(self, app: ASGIApp, routes_app: Any) -> None:
        self.app = app
        self.routes_app = routes_app  # its state.ctx is the server context
        self._counted = metrics.HTTP_REQUESTS.labels("agents.lease")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        self._counted.inc()
        status, why = self._renew(scope)
        if status == 204:
            await send(_NO_CONTENT)
            await send(_EMPTY)
            return
        codes = {400: "invalid_request", 401: "unauthorized", 405: "method_not_allowed"}
        headers = [(b"connection", b"close")] if status == 400 else []
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status == 405:
            headers.append((b"allow", b"POST"))
        body = error_body(codes.get(status, "exchange_needed"), why)
        await send_json(send, status, body, headers)

    def _renew(self, scope: Scope) -> tuple[int, str]:
        if scope["method"] != "POST":
            return 405, f"{PATH} takes POST"
        auth = incarnation = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == _INCARNATION:
                incarnation = value
            elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return 400, f"{PATH} takes no body"
        scheme, _, secret = auth.decode("latin-1").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return 401, "missing bearer token (Authorization: Bearer ...)"
        try:
            n = int(incarnation)
        except ValueError:
            return 400, f"{INCARNATION_HEADER}: an integer header is required"
        ctx = self.routes_app.state.ctx
        instance_id = ctx.leases.credentials.get(hash_secret(secret))
        renewed = Renewed.REFUSED if instance_id is None else renew_by_request(ctx, instance_id, n)
        if renewed is Renewed.REFUSED:
            return 409, "run a full heartbeat exchange first"
        metrics.LEASE_RENEWALS.inc()
        if renewed is Renewed.NEWS:
            return 409, "renewed; run a full heartbeat exchange: there is news for this instance"
        return 204, ""
