"""`corral server`: one API server (several may share a PostgreSQL database)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import typer

from corral import default_data_dir, eventloop, logsetup
from corral.server.app import StartupError
from corral.server.config import DEFAULT_PORT, ServerConfig, password_in_arguments
from corral.server.context import ServerContext
from corral.store.db import DatabaseUrlError

# Run before a server accepts requests. The composition root (corral.cli) plugs the
# instance providers in here: this package may not import corral.backends.
PREPARE: list[Callable[[ServerContext], Awaitable[None]]] = []


def add_timing_options(
    config: ServerConfig,
    agent_grace,
    start_timeout,
    attempt_grace,
    heartbeat_interval,
    install_backoff=None,
    install_cap=None,
    autoscale_interval=None,
    lease_interval=None,
) -> ServerConfig:
    if agent_grace is not None:
        config.agent_grace = agent_grace
    if start_timeout is not None:
        config.start_timeout = start_timeout
    if attempt_grace is not None:
        config.attempt_grace = attempt_grace
    if heartbeat_interval is not None:
        config.heartbeat_base = heartbeat_interval
    if lease_interval is not None:
        config.lease_base = lease_interval
    if install_backoff is not None:
        config.install_backoff = install_backoff
    if install_cap is not None:
        config.install_cap = install_cap
    if autoscale_interval is not None:
        config.autoscale_interval = autoscale_interval
    return config


def server(
    db: str | None = typer.Option(
        None,
        "--db",
        envvar="CORRAL_DB",
        help="database URL: sqlite:///PATH (default: DATA_DIR/corral.db) or "
        "postgresql://USER@HOST:PORT/DB (needed for several servers)",
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(DEFAULT_PORT, help="port to listen on (0: any free port)"),
    data_dir: Path = typer.Option(
        None,
        "--data-dir",
        help="where tokens and the SQLite database live (default ~/.corral or CORRAL_DATA_DIR)",
    ),
    public_url: str | None = typer.Option(
        None, help="URL agents and clients use to reach this server, if not http://HOST:PORT"
    ),
    agent_grace: float | None = typer.Option(
        None,
        help="seconds without a heartbeat or lease renewal before an instance counts as "
        "lost, at least; agents told to renew less often get 3 intervals + 1 s [10]",
    ),
    start_timeout: float | None = typer.Option(
        None, help="seconds an attempt may take to start before it is requeued [60]"
    ),
    attempt_grace: float | None = typer.Option(
        None, help="seconds a running attempt's runner may be silent [60]"
    ),
    heartbeat_interval: float | None = typer.Option(
        None, help="agent heartbeat interval for small fleets, seconds [2]"
    ),
    lease_interval: float | None = typer.Option(
        None,
        help="how often agents renew their lease between heartbeats once the fleet is large "
        "enough that heartbeats come less often than this, seconds [2]",
    ),
    install_backoff: float | None = typer.Option(
        None, help="seconds before an install order is repeated; doubles each time [30]"
    ),
    install_cap: int | None = typer.Option(
        None, min=1, help="install orders per instance and version before giving up [5]"
    ),
    provision_backoff: float | None = typer.Option(
        None, help="seconds before a failed provisioning (ssh fleets) is retried; doubles [10]"
    ),
    provision_cap: int | None = typer.Option(
        None, min=1, help="provisioning tries per instance before giving up [5]"
    ),
    register_timeout: float | None = typer.Option(
        None, help="seconds a provisioned agent has to register before it is retried [120]"
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="serve https with this certificate (PEM; with --tls-key)"
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", help="the certificate's private key (PEM, keep it 0600)"
    ),
    public_metrics: bool = typer.Option(
        False,
        "--public-metrics",
        help="serve /metrics and /docs without a token (default: an admin token is needed)",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
) -> None:
    """Run an API server with its background loops (dispatcher, reaper, ...).

    On first start it creates an admin token (DATA_DIR/admin.token, for users) and a
    join token (DATA_DIR/join.token, for agents), both mode 0600, and the key that
    seals secrets at rest (DATA_DIR/secret.key, or CORRAL_SECRET_KEY; every server of
    one database needs the same key). With --tls-cert/--tls-key it serves https; agents
    and clients trust a private CA with --ca FILE or CORRAL_CA.
    """
    logsetup.setup(log_level)
    from corral.server.main import serve

    if db and password_in_arguments(db, sys.argv[1:]):
        logging.getLogger("corral.server").warning(
            "the database password is on this server's command line (--db), which every "
            "process on this host can read in /proc: give the URL in CORRAL_DB instead, "
            "or keep the password in a PGPASSFILE"
        )

    try:
        config = ServerConfig(
            data_dir=data_dir or default_data_dir(),
            db_url=db,
            host=host,
            port=port,
            public_url=public_url,
            tls_cert=tls_cert,
            tls_key=tls_key,
            public_metrics=public_metrics,
        )
        add_timing_options(
            config,
            agent_grace,
            start_timeout,
            attempt_grace,
            heartbeat_interval,
            install_backoff,
            install_cap,
            lease_interval=lease_interval,
        )
        if provision_backoff is not None:
            config.provision_backoff = provision_backoff
        if provision_cap is not None:
            config.provision_cap = provision_cap
        if register_timeout is not None:
            config.register_timeout = register_timeout
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    def ready(ctx) -> None:
        typer.echo(
            f"corral server {ctx.server_id} listening on {config.url} "
            f"(database {ctx.db.display_url()})",
            err=True,
        )
        typer.echo(
            f"admin token: {config.data_dir / 'admin.token'}; "
            f"join token: {config.data_dir / 'join.token'}",
            err=True,
        )

    async def prepare(ctx: ServerContext) -> None:
        for hook in PREPARE:
            await hook(ctx)

    try:
        eventloop.run(serve(config, prepare=prepare, on_ready=ready))
    except (StartupError, DatabaseUrlError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
