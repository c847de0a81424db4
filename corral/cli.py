"""The `corral` entry point: user commands plus the daemons (server, agent, up).

The daemons are registered as thin commands that load the server stack only when one
of them runs (`corral --help` and the client commands never import FastAPI, SQLAlchemy,
Alembic, asyncpg or uvicorn). Without `corral[server]` installed they say so.

`corral NAME ...` builds only the command NAME: it imports only the module that
defines NAME (COMMAND_MODULES) and has Typer build that one command, not all of them
(see `command_for`). `corral --help`, an unknown name, and `corral.cli.app` get the
whole app.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable
from typing import Any

import typer

from corral.client import cli as user_cli

# the modules that define commands besides corral.client.cli (and the daemons here), in
# the order their commands are listed; COMMAND_MODULES says which one defines a name
# (tests/test_cli_imports.py checks this table against the commands)
MODULES = (
    "corral.client.components_cli",
    "corral.client.context_cli",
    "corral.client.data_cli",
    "corral.client.tokens_cli",
)
COMMAND_MODULES = {
    "rollout": "corral.client.components_cli",
    "rollouts": "corral.client.components_cli",
    "components": "corral.client.components_cli",
    "context": "corral.client.context_cli",
    "outputs": "corral.client.data_cli",
    "put": "corral.client.data_cli",
    "drain": "corral.client.data_cli",
    "undrain": "corral.client.data_cli",
    "fleets": "corral.client.data_cli",
    "scale": "corral.client.data_cli",
    "fleet": "corral.client.data_cli",
    "tokens": "corral.client.tokens_cli",
}

SERVER_EXTRA_HINT = "pip install 'corral[server]'"

# the modules only `corral[server]` installs; a missing one means the extra is missing
SERVER_PACKAGES = (
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "alembic",
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
    @user_cli.app.command(
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


def skip_httpx_cli() -> None:
    """httpx's `__init__` imports its own command-line client (httpx._main, which loads
    click, rich's progress and syntax and pygments when they are installed) and falls
    back to a stub when that import fails. This process never runs httpx's CLI, and
    importing it was about a tenth of `corral run`'s start-up, so it is marked absent
    (sys.modules[name] = None makes its import fail) before anything imports httpx.
    Only the `corral` command does this, never `import corral` (the SDK in a user's
    program leaves httpx as it is)."""
    if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
        sys.modules["httpx._main"] = None  # type: ignore[assignment]


def full_app() -> typer.Typer:
    """The app with every command registered, listed in their usual order (the user
    commands, then the daemons) whatever order their modules were imported in."""
    for module in MODULES:
        importlib.import_module(module)
    order = ["corral.client.cli", *MODULES, __name__]

    def rank(module: str) -> float:  # a module not in the table: before the daemons
        return order.index(module) if module in order else len(order) - 1.5

    app = user_cli.app
    app.registered_commands.sort(key=lambda c: rank(_module_of(c.callback)))
    app.registered_groups.sort(key=lambda g: rank(_group_module(g)))
    return app


def _module_of(func: Any) -> str:
    return getattr(func, "__module__", "")


def _group_module(group: Any) -> str:
    """The module that defines a command group (that of its first command)."""
    return _module_of(group.typer_instance.registered_commands[0].callback)


APP_OPTIONS = ("--ca", "--server", "--token")  # the app's own options that take a value


def command_name(args: list[str]) -> str | None:
    """The command `corral ARGS` runs: the first argument after the app's own options
    (--ca FILE, --server URL, --token T); None when there is none or another app option
    comes first (--help, --version, completion): those need the whole app."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in APP_OPTIONS:
            i += 2
        elif arg.startswith(tuple(f"{o}=" for o in APP_OPTIONS)):
            i += 1
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def command_for(args: list[str]) -> typer.Typer:
    """What runs `corral ARGS`: a copy of the app that holds only the command (or
    command group) ARGS name, so that Typer builds that one and not the other thirty;
    the whole app when ARGS name none of them (help, usage errors, a misspelt name)."""
    name = command_name(args)
    if name is None:
        return full_app()
    if name in COMMAND_MODULES:
        importlib.import_module(COMMAND_MODULES[name])
    app = user_cli.app
    commands = [
        c
        for c in app.registered_commands
        if (c.name or typer.main.get_command_name(getattr(c.callback, "__name__", ""))) == name
    ]
    groups = [g for g in app.registered_groups if g.name == name]
    if len(commands) + len(groups) != 1:
        return full_app()
    only = copy.copy(app)
    only.registered_commands = commands
    only.registered_groups = groups
    return only


def __getattr__(name: str) -> Any:
    """`corral.cli.app`: the whole app (for tests and tools that drive it in-process)."""
    if name == "app":
        return full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    skip_httpx_cli()
    command_for(sys.argv[1:])()


if __name__ == "__main__":
    main()
