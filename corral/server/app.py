"""Server assembly: open the store, bootstrap credentials, build the FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pydantic.warnings
from fastapi import FastAPI

import corral
from corral.domain.backoff import Backoff
from corral.domain.provisioning import ProvisionPolicy
from corral.domain.reconcile import InstallPolicy
from corral.server import errors, metrics, openapi
from corral.server.api import (
    agents,
    attempts,
    bootstrap,
    components,
    fleet,
    health,
    instances_admin,
    jobs,
    objects,
)
from corral.server.api import (
    tokens as tokens_api,
)
from corral.server.config import ServerConfig
from corral.server.context import ServerContext
from corral.server.guard import BodyGuard
from corral.server.health import install_health
from corral.server.lease_route import LeaseRoute
from corral.server.leases import flush_leases
from corral.server.loops.autoscaler import autoscale_once
from corral.server.loops.dispatcher import dispatch_once
from corral.server.loops.drainer import drain_once
from corral.server.loops.fleets import provision_once
from corral.server.loops.presence import presence_once
from corral.server.loops.reaper import reap_once
from corral.server.loops.reconciler import reconcile_once
from corral.server.loops.runner import run_loop
from corral.server.loops.verifier import prove_once
from corral.server.secretfiles import write_secret_file
from corral.store import events, fleets, servers, tokens
from corral.store import jobs as jobs_store
from corral.store.db import Database
from corral.store.migrate import migrate
from corral.store.sealing import Sealer, SealError
from corral.store.sqlite_lock import SqliteServerLock
from corral.store.wakebus import WakeBus

log = logging.getLogger("corral.server")

ADMIN_TOKEN_FILE = "admin.token"
JOIN_TOKEN_FILE = "join.token"
SERVER_FILE = "server.json"
SECRET_KEY_FILE = "secret.key"


async def _ensure_token(db: Database, kind: str, path: Path, now: float, note: str) -> str:
    """Reuse the token in `path` if the database knows it; otherwise mint one."""
    if path.exists():  # noqa: ASYNC240 - once, at start-up
        secret = path.read_text().strip()  # noqa: ASYNC240
        if await db.query(tokens.lookup, secret) is not None:
            os.chmod(path, 0o600)
            return secret
    secret = await db.transact(tokens.create_token, kind, now, note=note)
    write_secret_file(path, secret)
    return secret


class StartupError(RuntimeError):
    pass


def private_data_dir(path: Path) -> None:
    """The data dir holds the database, the credentials and the server key: only its
    owner may enter it (0700), also when it existed before with a looser mode."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def server_sealer(config: ServerConfig) -> Sealer:
    """The key secrets at rest are sealed with: CORRAL_SECRET_KEY (config.secret_key),
    else DATA_DIR/secret.key, made (0600) on first start."""
    if config.secret_key:
        try:
            return Sealer(config.secret_key)
        except SealError as exc:
            raise StartupError(f"CORRAL_SECRET_KEY: {exc}") from None
    path = config.data_dir / SECRET_KEY_FILE
    if path.exists():
        os.chmod(path, 0o600)
        try:
            return Sealer(path.read_text().strip())
        except SealError as exc:
            raise StartupError(f"{path}: {exc}") from None
    key = Sealer.new_key()
    write_secret_file(path, key)
    return Sealer(key)


async def open_context(
    config: ServerConfig, *, clock: Callable[[], float] = time.time, backends=None
) -> ServerContext:
    """Everything a server needs before it accepts a request. Raises StartupError
    with a message for people (e.g. a second server on one SQLite file)."""
    private_data_dir(config.data_dir)
    db = Database(config.database_url, sealer=server_sealer(config))
    server_id = f"srv-{secrets.token_hex(4)}"
    lock = None
    if db.is_sqlite and db.sqlite_path:
        from corral.store.sqlite_lock import DatabaseInUse

        lock = SqliteServerLock(db.sqlite_path)
        try:
            lock.acquire(f"server {server_id}, pid {os.getpid()}, {config.url}")
        except DatabaseInUse as exc:
            await db.dispose()
            raise StartupError(str(exc)) from None
    try:
        revision = await migrate(db)
    except Exception as exc:
        await db.dispose()
        if lock:
            lock.release()
        raise StartupError(f"cannot open database {db.display_url()}: {exc}") from exc
    try:
        await db.query(jobs_store.check_server_key)
        sealed = await db.transact(fleets.seal_plaintext_secrets)
    except SealError as exc:
        await db.dispose()
        if lock:
            lock.release()
        raise StartupError(str(exc)) from None
    if sealed:
        log.warning("sealed the durable store keys of %d fleet(s) kept in clear", sealed)
    now = clock()
    admin = await _ensure_token(
        db, tokens.ADMIN, config.data_dir / ADMIN_TOKEN_FILE, now, "admin (created on first start)"
    )
    join = await _ensure_token(
        db, tokens.JOIN, config.data_dir / JOIN_TOKEN_FILE, now, "join (created on first start)"
    )
    await db.transact(
        servers.register_server,
        id=server_id,
        build_version=config.build_version,
        host=socket.gethostname(),
        pid=os.getpid(),
        url=config.url,
        now=now,
    )
    await db.transact(
        events.record,
        now,
        "info",
        "server.started",
        f"server {server_id} (build {config.build_version}) started on {config.url}, "
        f"database {db.display_url()} at revision {revision}",
        server_id=server_id,
    )
    ctx = ServerContext(
        config=config,
        db=db,
        server_id=server_id,
        clock=clock,
        backends=dict(backends or {}),
        started_at=now,
        admin_token=admin,
        join_token=join,
        sqlite_lock=lock,
        install_policy=InstallPolicy(
            backoff=Backoff(
                base=config.install_backoff,
                factor=2.0,
                maximum=max(config.install_backoff_max, config.install_backoff),
                jitter=0.2,
            ),
            cap=config.install_cap,
        ),
        health_providers=[install_health],
        provision_policy=ProvisionPolicy(
            backoff=Backoff(
                base=config.provision_backoff,
                factor=2.0,
                maximum=max(config.provision_backoff_max, config.provision_backoff),
                jitter=0.2,
            ),
            cap=config.provision_cap,
            register_timeout=config.register_timeout,
        ),
    )
    return ctx


async def close_context(ctx: ServerContext) -> None:
    tries = list(ctx.provisioning.values())
    for task in tries:  # a try cut short is taken over by the next server to look
        task.cancel()
    await asyncio.gather(*tries, return_exceptions=True)
    for backend in ctx.backends.values():
        try:
            await backend.close()
        except Exception:
            log.exception("backend %s did not close cleanly", backend.name)
    try:
        await ctx.db.transact(servers.stop_server, ctx.server_id, ctx.now())
    except Exception:
        log.exception("could not mark server %s stopped", ctx.server_id)
    await ctx.db.dispose()
    lock = ctx.sqlite_lock
    if lock:
        lock.release()


def start_loops(ctx: ServerContext) -> list[asyncio.Task]:
    cfg = ctx.config
    specs = [
        ("dispatcher", dispatch_once, cfg.dispatch_interval, "dispatch"),
        ("reaper", reap_once, cfg.reaper_interval, None),
        ("leases", flush_leases, cfg.lease_flush_interval, None),
        ("presence", presence_once, cfg.presence_interval, None),
        ("fleets", provision_once, 2.0, "fleets"),
        ("reconciler", reconcile_once, cfg.reconcile_interval, "reconcile"),
        ("drainer", drain_once, cfg.drain_interval, "drain"),
        ("verifier", prove_once, max(cfg.drain_interval, 2.0), None),
        ("autoscaler", autoscale_once, cfg.autoscale_interval, None),
    ]
    loop = asyncio.get_running_loop()
    return [
        loop.create_task(run_loop(ctx, name, body, interval, key), name=f"corral-{name}")
        for name, body, interval, key in specs
    ]


def start_wake_bus(ctx: ServerContext) -> asyncio.Task | None:
    """On PostgreSQL: share long-poll wake-ups with the other servers (LISTEN/NOTIFY)."""
    if not ctx.db.is_postgres:
        return None
    bus = WakeBus(
        ctx.db.url,
        on_keys=lambda keys: ctx.notifier.wake_local(*keys),
        on_state=ctx.notifier.set_cross_server,
    )
    ctx.notifier.publish = bus.publish
    return asyncio.get_running_loop().create_task(bus.run(), name="corral-wake-bus")


def _quiet_body_alias_warning() -> None:
    """FastAPI (0.165) hands pydantic an `alias` for each body parameter it validates,
    which pydantic (2.12+) warns has no effect there, at the first request of each
    route: noise on the operator's terminal about no setting of theirs or corral's."""
    category = getattr(pydantic.warnings, "UnsupportedFieldAttributeWarning", None)
    if category is not None:
        warnings.filterwarnings(
            "ignore", message=r"The 'alias' attribute with value", category=category
        )


def create_app(ctx: ServerContext) -> FastAPI:
    _quiet_body_alias_warning()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = start_loops(ctx)
        bus = start_wake_bus(ctx)
        if bus is not None:
            tasks.append(bus)
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:  # renewals heard but not written: the agents are alive
                await flush_leases(ctx)
            except Exception:
                log.exception("could not write the last lease renewals")

    app = FastAPI(
        title="corral",
        version=corral.__version__,
        description="Control plane for batch and ML jobs on a fleet of machines.",
        lifespan=lifespan,
        docs_url=None,  # served by the health router, behind a token
        redoc_url=None,
    )
    app.state.ctx = ctx
    metrics.BUILD_INFO.labels(ctx.config.build_version, ctx.server_id).set(1)
    errors.install(app)
    app.add_middleware(BodyGuard, routes_app=app)
    app.add_middleware(LeaseRoute, routes_app=app)  # outermost: before anything else runs
    for module in (
        jobs,
        attempts,
        agents,
        components,
        objects,
        instances_admin,
        fleet,
        health,
        bootstrap,
        tokens_api,
    ):
        app.include_router(module.router)
    app.include_router(attempts.relay_router)
    from corral.server import dashboard

    app.include_router(dashboard.router)
    app.mount("/static", dashboard.static, name="static")
    openapi.install(app)
    return app


def write_server_file(config: ServerConfig, ctx: ServerContext) -> None:
    path = config.data_dir / SERVER_FILE
    tmp = path.with_name(f".{SERVER_FILE}.tmp")
    tmp.write_text(json.dumps({"url": config.url, "server_id": ctx.server_id, "pid": os.getpid()}))
    os.replace(tmp, path)
