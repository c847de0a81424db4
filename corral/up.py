"""`corral up`: an all-in-one local cluster (a server on SQLite plus N local agents)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from corral import logsetup
from corral.backends.local import LocalBackend
from corral.server.app import StartupError
from corral.server.config import DEFAULT_PORT, ServerConfig, default_data_dir
from corral.store import fleets

LOCAL_FLEET = "local"


def up(
    agents: int = typer.Option(2, "--agents", "-n", min=0, max=64,
                               help="local agent processes to run"),
    data_dir: Path = typer.Option(None, "--data-dir", help="where everything is kept "
                                  "(default ~/.corral or CORRAL_DATA_DIR)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(DEFAULT_PORT, help="port to listen on (0: any free port)"),
    agent_cpus: float = typer.Option(None, help="cpus each agent offers (default: all)"),
    log_level: str = typer.Option("warning", help="debug, info, warning, error"),
) -> None:
    """Start a server on SQLite and a local fleet of N agents; Ctrl-C stops them all.

    Then, in another terminal: corral run -- echo hello
    """
    logsetup.setup(log_level)
    from corral.server.main import serve

    config = ServerConfig(data_dir=data_dir or default_data_dir(), host=host, port=port)

    async def prepare(ctx) -> None:  # noqa: ANN001
        ctx.backends["local"] = LocalBackend(
            config.data_dir, server_urls=[config.url], join_token=ctx.extras["join_token"],
            cpus=agent_cpus,
        )
        await ctx.db.transact(
            fleets.upsert_fleet, name=LOCAL_FLEET, backend="local", min_size=agents,
            max_size=max(agents, 1), target_size=agents, now=ctx.now(),
        )

    def ready(ctx) -> None:  # noqa: ANN001
        admin = ctx.extras["admin_token"]
        typer.echo(f"corral is up: a server and {agents} local agent(s)")
        typer.echo(f"  API        {config.url}/api/v1   (OpenAPI: {config.url}/docs)")
        typer.echo(f"  dashboard  {config.url}/?token={admin}")
        typer.echo(f"  data       {config.data_dir}")
        if config.data_dir.resolve() != default_data_dir().resolve() or port != DEFAULT_PORT:
            typer.echo(f"  in another shell: export CORRAL_SERVER={config.url} "
                       f"CORRAL_TOKEN=$(cat {config.data_dir / 'admin.token'})")
        typer.echo("try: corral run -- echo hello        (Ctrl-C here stops everything)")

    try:
        asyncio.run(serve(config, prepare=prepare, on_ready=ready))
    except (StartupError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("corral stopped: agents and server are down", err=True)
