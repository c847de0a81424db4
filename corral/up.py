"""`corral up`: an all-in-one local cluster (a server on SQLite plus N local agents)."""

from __future__ import annotations

from pathlib import Path

import typer

from corral import default_data_dir, eventloop, logsetup
from corral.backends.local import LocalBackend
from corral.server.app import JOIN_TOKEN_FILE, StartupError
from corral.server.cli import add_timing_options
from corral.server.config import DEFAULT_PORT, ServerConfig
from corral.store import fleets
from corral.wiring import plug_backends

LOCAL_FLEET = "local"


def up(
    agents: int = typer.Option(
        2, "--agents", "-n", min=0, max=64, help="local agent processes to run"
    ),
    data_dir: Path = typer.Option(
        None, "--data-dir", help="where everything is kept (default ~/.corral or CORRAL_DATA_DIR)"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(DEFAULT_PORT, help="port to listen on (0: any free port)"),
    agent_cpus: float = typer.Option(None, help="cpus each agent offers (default: all)"),
    public_url: str = typer.Option(
        None, hidden=True, help="URL the agents use to reach the server, if not http://HOST:PORT"
    ),
    agent_grace: float = typer.Option(None, hidden=True),
    start_timeout: float = typer.Option(None, hidden=True),
    attempt_grace: float = typer.Option(None, hidden=True),
    heartbeat_interval: float = typer.Option(None, hidden=True),
    autoscale_interval: float = typer.Option(None, hidden=True),
    public_metrics: bool = typer.Option(
        False,
        "--public-metrics",
        help="serve /metrics and /docs without a token (default: an admin token is needed)",
    ),
    log_level: str = typer.Option("warning", help="debug, info, warning, error"),
) -> None:
    """Start a server on SQLite and a local fleet of N agents; Ctrl-C stops them all.

    Then, in another terminal: corral run -- echo hello
    """
    logsetup.setup(log_level)
    from corral.server.main import serve

    config = ServerConfig(
        data_dir=data_dir or default_data_dir(),
        host=host,
        port=port,
        public_url=public_url,
        public_metrics=public_metrics,
    )
    # tokens, the database and the agents' data: none of it for anyone else, jobs included
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.data_dir.chmod(0o700)
    add_timing_options(
        config,
        agent_grace,
        start_timeout,
        attempt_grace,
        heartbeat_interval,
        autoscale_interval=autoscale_interval,
    )

    async def prepare(ctx) -> None:
        ctx.backends["local"] = LocalBackend(
            config.data_dir,
            server_urls=[config.url],
            join_token_file=config.data_dir / JOIN_TOKEN_FILE,
            cpus=agent_cpus,
        )
        await plug_backends(ctx)

        async def fleet(conn) -> None:
            f = await fleets.get_fleet(conn, LOCAL_FLEET)
            lo, hi = (
                (min(f["min_size"], agents), max(f["max_size"], agents)) if f else (agents, agents)
            )
            await fleets.upsert_fleet(
                conn,
                name=LOCAL_FLEET,
                backend="local",
                min_size=lo,
                max_size=hi,
                target_size=agents,
                now=ctx.now(),
                idle_timeout=f["idle_timeout"] if f else 300.0,
                cpus=f["cpus"] if f else None,
                memory_mb=f["memory_mb"] if f else None,
                spec=f["spec"] if f else None,
            )

        await ctx.db.transact(fleet)

    def ready(ctx) -> None:
        admin = ctx.admin_token
        typer.echo(f"corral is up: a server and {agents} local agent(s)")
        typer.echo(f"  API        {config.url}/api/v1   (OpenAPI: {config.url}/docs)")
        typer.echo(f"  dashboard  {config.url}/?token={admin}")
        typer.echo(f"  data       {config.data_dir}")
        if config.data_dir.resolve() != default_data_dir().resolve() or port != DEFAULT_PORT:
            typer.echo(
                f"  in another shell: export CORRAL_SERVER={config.url} "
                f"CORRAL_TOKEN=$(cat {config.data_dir / 'admin.token'})"
            )
        typer.echo("try: corral run -- echo hello        (Ctrl-C here stops everything)")

    try:
        eventloop.run(serve(config, prepare=prepare, on_ready=ready))
    except (StartupError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("corral stopped: agents and server are down", err=True)
