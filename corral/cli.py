"""The `corral` entry point: user commands plus the daemons (server, agent, up).

The daemons are registered as thin commands that load the server stack only when one
of them runs (`corral --help` and the client commands never import FastAPI, SQLAlchemy,
Alembic, asyncpg or uvicorn). Without `corral[server]` installed they say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from corral.client import (  # noqa: F401  (register their commands)
    components_cli,
    context_cli,
    data_cli,
    tokens_cli,
)
from corral.client.cli import app

SERVER_EXTRA_HINT = "pip install 'corral[server]'"

# the modules only `corral[server]` installs; a missing one means the extra is missing
SERVER_PACKAGES = (
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "prometheus_client",
    "jinja2",
    "psutil",
    "asyncssh",
)


def _server_up() -> Callable[..., Any]:
    from corral.up import up

    return up


def _server_server() -> Callable[..., Any]:
    from corral.server import cli as server_cli
    from corral.wiring import plug_backends

    if plug_backends not in server_cli.PREPARE:
        server_cli.PREPARE.append(plug_backends)
    return server_cli.server


def _server_agent() -> Callable[..., Any]:
    from corral.agent.cli import agent

    return agent


def load_daemon(name: str, loader: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """The real command behind `corral NAME`, or a clear error when the server extra
    is not installed."""
    try:
        return loader()
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in SERVER_PACKAGES:
            from corral.client.render import say

            say(
                ("error:", "red"),
                f" `corral {name}` needs the server and agent, which are not installed "
                f"(no module {missing!r}). Install them with: {SERVER_EXTRA_HINT}",
                err=True,
            )
            raise typer.Exit(2) from None
        raise


def _daemon(name: str, summary: str, loader: Callable[[], Callable[..., Any]]) -> None:
    @app.command(
        name=name,
        help=summary,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def command(ctx: typer.Context) -> None:
        real = typer.main.get_command(_single(load_daemon(name, loader)))
        real.main(list(ctx.args), prog_name=f"corral {name}", standalone_mode=True)


def _single(func: Callable[..., Any]) -> typer.Typer:
    t = typer.Typer(
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
    )
    t.command()(func)
    return t


_daemon("up", "All-in-one local cluster: a server on SQLite and N local agents.", _server_up)
_daemon("server", "Run an API server (corral[server]).", _server_server)
_daemon("agent", "Run the agent of one instance (corral[server]).", _server_agent)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
