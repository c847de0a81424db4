"""The web dashboard: server-rendered pages (Jinja, autoescaped), a small script and a
style sheet shipped in the package, nothing fetched from elsewhere.

Sign in with the admin token through the form at /login: the server checks it and
keeps it in an HttpOnly, SameSite=Strict cookie. Pages refresh their live parts by
fetching server-rendered fragments (`?fragment=1`); a job's log follows over
server-sent events, like `corral logs -f`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from corral.domain.jobs import FINAL_JOB_STATES, JobState
from corral.server import charts, metrics
from corral.server.api import instances_admin
from corral.server.api import objects as objects_api
from corral.server.api.jobs import job_key
from corral.server.context import ServerContext, get_ctx
from corral.server.errors import ApiError
from corral.server.guard import DASHBOARD_COOKIE, public_form
from corral.server.health import health_report
from corral.server.views import (
    attempt_view,
    event_view,
    fleet_views,
    instance_view,
    job_view,
    rollout_view,
    server_view,
)
from corral.store import components, events, instances, servers, tokens
from corral.store import dashboard as dash_repo
from corral.store import jobs as jobs_repo
from corral.store import metrics as metrics_repo
from corral.store import objects as objects_repo

router = APIRouter(include_in_schema=False)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
static = StaticFiles(directory=str(HERE / "static"))
COOKIE = DASHBOARD_COOKIE
PAGE = 50
JOB_STATES = [s.value for s in JobState]


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


templates.env.filters["when"] = _when
templates.env.filters["age"] = _age
templates.env.filters["size"] = _size
templates.env.filters["urlpart"] = lambda s: quote(str(s), safe="/")


# ---- sign-in ------------------------------------------------------------------------------


async def _signed_in(request: Request, ctx: ServerContext) -> bool:
    secret = request.cookies.get(COOKIE)
    if not secret:
        return False
    row = await ctx.db.query(tokens.lookup, secret)
    return row is not None and row["kind"] == tokens.ADMIN


def _safe_next(target: str | None) -> str:
    """Only a path on this server (no scheme, no host, no `//`)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


async def _guard(request: Request, ctx: ServerContext) -> Response | None:
    """None when signed in; else where to go (fragments and streams get a bare 401,
    which the page script turns into a visit to the login form)."""
    if await _signed_in(request, ctx):
        return None
    if request.query_params.get("fragment") or request.url.path.startswith("/ui/"):
        return Response("sign in again", status_code=401)
    return _to_login(request)


def _same_origin(request: Request) -> None:
    """Forms that change something must come from this dashboard (the cookie is
    SameSite=Strict as well)."""
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise ApiError(403, "forbidden", "cross-origin form submission refused")


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body())[:65536].decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _login_page(request: Request, ctx: ServerContext, error: str | None, nxt: str, status: int):
    return templates.TemplateResponse(
        request,
        "login.html",
        {"error": error, "next": nxt, "data_dir": str(ctx.config.data_dir)},
        status_code=status,
    )


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, ctx: ServerContext = Depends(get_ctx)):
    return _login_page(request, ctx, None, _safe_next(request.query_params.get("next")), 200)


@router.post("/login", response_class=HTMLResponse)
@public_form
async def login(request: Request, ctx: ServerContext = Depends(get_ctx)):
    _same_origin(request)
    form = await _form(request)
    secret = form.get("token", "").strip()
    nxt = _safe_next(form.get("next"))
    row = await ctx.db.query(tokens.lookup, secret) if secret else None
    if row is None or row["kind"] != tokens.ADMIN:
        why = (
            "enter the admin token"
            if not secret
            else "this token is unknown or revoked"
            if row is None
            else f"a {row['kind']} token cannot sign in; use the admin token"
        )
        return _login_page(request, ctx, why, nxt, 401)
    response = RedirectResponse(nxt, status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request):
    _same_origin(request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


# ---- overview -----------------------------------------------------------------------------


CHART_TTL = 10.0  # seconds a server reuses its charts (one query of every live job)
_charts: dict[str, tuple[float, list]] = {}  # server id -> (drawn at, charts)


async def _charts_for(ctx: ServerContext, now: float) -> list:
    cached = _charts.get(ctx.server_id)
    if cached and 0 <= now - cached[0] < CHART_TTL:
        return cached[1]
    times = await ctx.db.query(metrics_repo.job_times, now - charts.WINDOW)
    queued, running, done = charts.job_series(times, now)
    latency = charts.latency_series(metrics.heartbeat_minutes(), now)
    drawn = [
        charts.svg("jobs queued / running (mean per minute)", [queued, running]),
        charts.svg("throughput (jobs finished per minute)", [done]),
        charts.svg("heartbeat handling, this server", [latency]),
    ]
    _charts[ctx.server_id] = (now, drawn)
    return drawn


async def _overview(ctx: ServerContext) -> dict:
    now = ctx.now()

    async def gather(conn):
        return (
            await jobs_repo.count_jobs_by_state(conn),
            await instances.list_instances(conn, include_terminated=False),
            await events.list_events(conn, min_level="info", limit=20, newest=True),
            await servers.list_servers(conn, include_stopped_since=now - 3600),
        )

    counts, inst_rows, event_rows, server_rows = await ctx.db.query(gather)
    return {
        "now": now,
        "counts": counts,
        "instances": [instance_view(r) for r in inst_rows],
        "events": [event_view(r) for r in event_rows],
        "servers": [server_view(r, now, ctx.config.server_grace) for r in server_rows],
        "health": await health_report(ctx),
        "charts": await _charts_for(ctx, now),
    }


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, ctx: ServerContext = Depends(get_ctx)):
    query_token = request.query_params.get("token")
    if query_token:  # the link `corral up` prints: checked, then kept in the cookie
        row = await ctx.db.query(tokens.lookup, query_token)
        if row is None or row["kind"] != tokens.ADMIN:
            return _login_page(request, ctx, "the token in the link is not valid", "/", 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, query_token, httponly=True, samesite="strict")
        return response
    if (r := await _guard(request, ctx)) is not None:
        return r
    data = await _overview(ctx)
    name = "_overview.html" if request.query_params.get("fragment") else "overview.html"
    return templates.TemplateResponse(request, name, {**data, "nav": "overview"})


# ---- jobs ---------------------------------------------------------------------------------


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r
    state = request.query_params.get("state") or ""
    search = (request.query_params.get("q") or "").strip()[:200]
    before_raw = request.query_params.get("before") or ""
    before = int(before_raw) if before_raw.isdigit() else None
    states = [state] if state in JOB_STATES else None
    rows = await ctx.db.query(
        jobs_repo.list_jobs, states=states, limit=PAGE + 1, before_id=before, search=search or None
    )
    page = [job_view(r) for r in rows[:PAGE]]
    context = {
        "nav": "jobs",
        "jobs": page,
        "state": state if states else "",
        "q": search,
        "before": before,
        "older": page[-1].id if len(rows) > PAGE else None,
        "states": JOB_STATES,
        "counts": await ctx.db.query(jobs_repo.count_jobs_by_state),
    }
    name = "_jobs.html" if request.query_params.get("fragment") else "jobs.html"
    return templates.TemplateResponse(request, name, context)


async def _job_context(ctx: ServerContext, job_id: int) -> dict:
    async def q(conn):
        row = await jobs_repo.require_job(conn, job_id)
        return (
            job_view(row, await jobs_repo.list_attempts(conn, job_id)),
            await objects_repo.list_outputs(conn, job_id),
        )

    job, outputs = await ctx.db.query(q)
    return {"job": job, "outputs": outputs, "final": job.state in FINAL_JOB_STATES}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: int, request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r
    try:
        context = await _job_context(ctx, job_id)
    except jobs_repo.JobNotFound:
        return _not_found(request, f"job {job_id} not found")
    name = "_job.html" if request.query_params.get("fragment") else "job.html"
    return templates.TemplateResponse(request, name, {**context, "nav": "jobs"})


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: int, request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r
    _same_origin(request)
    from corral.server.api.jobs import cancel

    await cancel(job_id, ctx)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/outputs/{path:path}")
async def download_output(
    job_id: int, path: str, request: Request, ctx: ServerContext = Depends(get_ctx)
):
    if (r := await _guard(request, ctx)) is not None:
        return r
    rows = await ctx.db.query(objects_repo.list_outputs, job_id)
    row = next((o for o in rows if o["path"] == path), None)
    if row is None:
        return _not_found(request, f"job {job_id} has no output {path}")
    response = await objects_api.content(row["sha256"], ctx)
    filename = quote(path.rsplit("/", 1)[-1])
    response.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{filename}"
    return response


def _sse(event: str, data: dict, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/ui/jobs/{job_id}/logs")
async def follow_logs(job_id: int, request: Request, ctx: ServerContext = Depends(get_ctx)):
    """Server-sent events: every attempt's log in order, then `end` once the job is
    final, like `corral logs -f`. A reconnect resumes after Last-Event-ID."""
    if (r := await _guard(request, ctx)) is not None:
        return r
    try:
        await ctx.db.query(jobs_repo.require_job, job_id)
    except jobs_repo.JobNotFound:
        return Response(f"job {job_id} not found", status_code=404)
    attempt, seq = 1, -1
    last = request.headers.get("last-event-id", "")
    a, _, s = last.partition(":")
    if a.isdigit() and s.lstrip("-").isdigit():
        attempt, seq = int(a), int(s)

    async def stream() -> AsyncIterator[str]:
        n, after = attempt, seq
        announced = 0 if after < 0 else n
        key = job_key(job_id)
        yield "retry: 1000\n\n"
        while not await request.is_disconnected():
            gen = ctx.notifier.generation(key)

            async def page(conn, n=n, after=after):
                job = await jobs_repo.require_job(conn, job_id)
                n_ok = 1 <= n <= job["current_attempt"]
                return job, (await jobs_repo.read_logs(conn, job_id, n, after, 500) if n_ok else [])

            job, chunks = await ctx.db.query(page)
            if chunks and announced != n:
                announced = n
                yield _sse("attempt", {"attempt": n}, f"{n}:{after}")
            for c in chunks:
                after = c["seq"]
                text = bytes(c["data"]).decode("utf-8", errors="replace")
                yield _sse("chunk", {"stream": c["stream"], "text": text}, f"{n}:{after}")
            if chunks:
                continue
            if n < job["current_attempt"]:
                n, after = n + 1, -1
                continue
            if job["state"] in FINAL_JOB_STATES:
                yield _sse(
                    "end",
                    {"state": job["state"], "exit_code": job["exit_code"], "reason": job["reason"]},
                )
                return
            if not await ctx.notifier.wait(key, gen, ctx.recheck(15.0)):
                yield ": keep-alive\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---- instances, fleets, rollouts ----------------------------------------------------------


@router.get("/instances/{ref}", response_class=HTMLResponse)
async def instance_page(ref: str, request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r

    async def q(conn):
        rows = await instances.list_instances(conn)
        row = next((i for i in rows if ref in (i["id"], i["name"])), None)
        if row is None:
            return None
        return (
            instance_view(row),
            await dash_repo.attempts_on(conn, row["id"]),
            await dash_repo.objects_held(conn, row["id"]),
            await dash_repo.components_of(conn, row["id"]),
        )

    found = await ctx.db.query(q)
    if found is None:
        return _not_found(request, f"instance {ref} not found")
    inst, attempt_rows, held, comps = found
    context = {
        "nav": "overview",
        "inst": inst,
        "heartbeat_age": ctx.now() - inst.last_heartbeat_at if inst.last_heartbeat_at else None,
        "attempts": [
            {"view": attempt_view(a), "job_id": a["job_id"], "name": a["job_name"]}
            for a in attempt_rows
        ],
        "objects": held,
        "components": comps,
        "message": request.query_params.get("msg"),
    }
    name = "_instance.html" if request.query_params.get("fragment") else "instance.html"
    return templates.TemplateResponse(request, name, context)


@router.post("/instances/{ref}/drain")
async def drain(ref: str, request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r
    _same_origin(request)
    try:
        view = await instances_admin.drain_instance(ref, None, ctx)
        msg = "drain requested" + (
            f"; {len(view.at_risk)} object(s) have no copy elsewhere yet" if view.at_risk else ""
        )
    except ApiError as exc:
        msg = exc.message
    return RedirectResponse(f"/instances/{quote(ref)}?msg={quote(msg)}", status_code=303)


@router.get("/fleets", response_class=HTMLResponse)
async def fleets_page(request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r

    async def q(conn):
        return (
            await fleet_views(conn),
            await instances.list_instances(conn, include_terminated=False),
        )

    fleet_rows, inst_rows = await ctx.db.query(q)
    context = {
        "nav": "fleets",
        "fleets": fleet_rows,
        "instances": [instance_view(r) for r in inst_rows],
        "now": ctx.now(),
    }
    name = "_fleets.html" if request.query_params.get("fragment") else "fleets.html"
    return templates.TemplateResponse(request, name, context)


@router.get("/rollouts", response_class=HTMLResponse)
async def rollouts_page(request: Request, ctx: ServerContext = Depends(get_ctx)):
    if (r := await _guard(request, ctx)) is not None:
        return r

    async def q(conn):
        return [await rollout_view(conn, r) for r in await components.list_rollouts(conn, 50)]

    context = {"nav": "rollouts", "rollouts": await ctx.db.query(q)}
    name = "_rollouts.html" if request.query_params.get("fragment") else "rollouts.html"
    return templates.TemplateResponse(request, name, context)


def _not_found(request: Request, message: str):
    return templates.TemplateResponse(
        request, "notfound.html", {"message": message, "nav": ""}, status_code=404
    )
