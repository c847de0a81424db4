"""The agent's calls to the server, each turned into the event the state machine takes.

These are I/O only: they send what an instruction says and say what came back
(`Registered`, `RegisterFailed`, `Retire`, `Fatal`, `HeartbeatReplied`,
`HeartbeatFailed`, `HeartbeatRejected`, `LostReported`). What to make of it is
`corral.agent.state`'s business.
"""

from __future__ import annotations

import random
import time

from corral.agent.state import (
    Event,
    Fatal,
    HeartbeatFailed,
    HeartbeatRejected,
    HeartbeatReplied,
    LeaseAnswered,
    LostReported,
    Registered,
    RegisterFailed,
    RenewLease,
    ReportCopies,
    ReportLost,
    Retire,
    SendHeartbeat,
)
from corral.agent.upstream import Unreachable
from corral.agent.upstream_async import AsyncServer
from corral.api import HeartbeatReply, HeartbeatRequest, RegisterReply

ATTEMPT_TOKEN_HEADER = "X-Corral-Attempt-Token"
LEASE_PATH = "/api/v1/agents/lease"  # corral.server.lease_route (not imported: server side)
INCARNATION_HEADER = "X-Corral-Incarnation"
BAD_CONFIGURATION = 2  # the agent's exit code when it cannot go on as configured


def error_message(resp) -> str:
    """The server's JSON error message (it says what is wrong and what to do)."""
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:500] or f"HTTP {resp.status_code}"


async def register(
    server: AsyncServer, body: dict, secret: str | None, known: bool
) -> tuple[Event, RegisterReply | None]:
    """Register (first time with the join token, `known` False) or again (with the
    instance's credential). Returns the event and, on a welcome, the reply."""
    if not secret:
        return Fatal(BAD_CONFIGURATION, "no join token and no identity: pass --join-token"), None
    try:
        resp = await server.request(
            "POST",
            "/api/v1/agents/register",
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
            deadline=time.monotonic() + 30,
        )
    except Unreachable as exc:
        return RegisterFailed(str(exc), random.random()), None
    if resp.status_code == 401 and known:
        # the credential is revoked (the instance retired, or an operator revoked it)
        # or unknown: never join as a new one
        return Retire(f"the server refuses this instance's credential: {error_message(resp)}"), None
    if resp.status_code >= 400:
        why = f"registration refused (HTTP {resp.status_code}): {error_message(resp)}"
        return Fatal(BAD_CONFIGURATION, why), None
    reply = RegisterReply.model_validate(resp.json())
    if reply.action == "exit":
        return Retire(reply.reason), None
    if reply.instance_id is None or (not known and reply.credential is None):
        return Fatal(BAD_CONFIGURATION, "the server welcomed this agent without an identity"), None
    event = Registered(
        reply.instance_id,
        reply.incarnation or 0,
        reply.interval,
        reply.credential,
        reply.lease_interval,
    )
    return event, reply


def heartbeat_body(hb: SendHeartbeat) -> HeartbeatRequest:
    """What a heartbeat sends (the simulator hands the same to the route's handler)."""
    return HeartbeatRequest(
        instance_id=hb.instance_id,
        incarnation=hb.incarnation,
        attempts=list(hb.attempts),
        components=list(hb.components),
        objects=list(hb.objects) if hb.objects is not None else None,
        object_errors=list(hb.object_errors),
        offloaded=list(hb.offloaded),
        offload_errors=list(hb.offload_errors),
        wait=hb.wait,
        renews_every=hb.renews_every,
    )


async def heartbeat(
    server: AsyncServer, hb: SendHeartbeat, credential: str, interval: float
) -> Event:
    body = heartbeat_body(hb).model_dump()
    try:
        resp = await server.request(
            "POST",
            "/api/v1/agents/heartbeat",
            json=body,
            timeout=interval + 30,
            headers={"Authorization": f"Bearer {credential}"},
            deadline=time.monotonic() + interval,
        )
    except Unreachable as exc:
        return HeartbeatFailed(str(exc), random.random())
    if resp.status_code == 401:
        return HeartbeatRejected()  # credential unknown: registering again decides
    if resp.status_code >= 400:
        return HeartbeatFailed(
            f"heartbeat: HTTP {resp.status_code} {resp.text[:200]}", random.random()
        )
    return HeartbeatReplied(HeartbeatReply.model_validate(resp.json()), hb.seq)


async def renew_lease(server: AsyncServer, order: RenewLease, credential: str) -> LeaseAnswered:
    """One lease renewal between exchanges (no body; the server answers 204, or 409
    when it wants a full exchange first)."""
    try:
        resp = await server.request(
            "POST",
            LEASE_PATH,
            headers={
                "Authorization": f"Bearer {credential}",
                INCARNATION_HEADER: str(order.incarnation),
            },
            timeout=order.within,
            deadline=time.monotonic() + order.within,
        )
    except Unreachable:
        return LeaseAnswered(renewed=False)
    if resp.status_code == 204:
        return LeaseAnswered(renewed=True)
    # 409 (exchange first), 401, or a server without the route: the exchange decides
    return LeaseAnswered(renewed=False, exchange=resp.status_code < 500)


REPORT_COPIES_WITHIN = 5.0


async def report_copies(server: AsyncServer, report: ReportCopies, credential: str) -> bool:
    """Tell the server ordered copies landed here. False: it did not hear (the next
    heartbeat's object list tells it)."""
    try:
        resp = await server.request(
            "POST",
            "/api/v1/agents/copies",
            json={
                "instance_id": report.instance_id,
                "incarnation": report.incarnation,
                "sha256s": list(report.sha256s),
            },
            headers={"Authorization": f"Bearer {credential}"},
            deadline=time.monotonic() + REPORT_COPIES_WITHIN,
        )
    except Unreachable:
        return False
    return resp.status_code == 200


RELAY_PATH = "/api/v1/agents/attempts"


async def relay_reports(
    server: AsyncServer, reports: list[dict], credential: str, within: float
) -> tuple[list[dict] | None, int | None]:
    """Runners' attempt reports as one request: (their answers in order, None) or, when
    the server did not answer them, (None, its HTTP status or None if unreachable)."""
    try:
        resp = await server.request(
            "POST",
            RELAY_PATH,
            json={"reports": reports},
            headers={"Authorization": f"Bearer {credential}"},
            deadline=time.monotonic() + within,
        )
    except Unreachable:
        return None, None
    if resp.status_code != 200:
        return None, resp.status_code
    try:
        results = resp.json()["results"]
    except (ValueError, KeyError, TypeError):
        return None, resp.status_code
    return results, None


async def report_lost(server: AsyncServer, order: ReportLost, within: float) -> LostReported:
    """Tell the server an attempt ended without its runner reporting (a 409 or 404
    means the server has moved on already: delivered all the same)."""
    try:
        await server.request(
            "POST",
            f"/api/v1/jobs/{order.job_id}/attempts/{order.attempt}/lost",
            json={"reason": order.reason[:4000]},
            headers={ATTEMPT_TOKEN_HEADER: order.token},
            deadline=time.monotonic() + within,
        )
    except Unreachable:
        return LostReported(order.job_id, order.attempt, False)
    return LostReported(order.job_id, order.attempt, True)
