"""`corral context add|use|list|remove`: named servers (and the token file for each),
kept in the user's config dir."""

from __future__ import annotations

from pathlib import Path

import typer

from corral.client import config
from corral.client.cli import JsonOpt, OutputOpt, app, fail
from corral.client.render import Col, output_format, print_data, say, table

context_app = typer.Typer(
    help="Contexts: named servers and the token file for each (corral context use NAME "
    "switches). Stored in $XDG_CONFIG_HOME/corral/config.json (mode 0600).",
    no_args_is_help=True,
)
app.add_typer(context_app, name="context")


def _load() -> dict:
    try:
        return config.load()
    except config.ConfigError as exc:
        fail(str(exc))


@context_app.command("add")
def add(
    name: str = typer.Argument(..., help="a name for this server, e.g. prod"),
    server: str = typer.Option(
        ..., "--server", help="server URL; several comma-separated are tried in turn"
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="a file holding the admin token (the token is not copied)"
    ),
    use: bool = typer.Option(False, "--use", help="also make it the current context"),
) -> None:
    """Add (or replace) a context."""
    try:
        servers = config.split_servers(server)
    except config.ConfigError as exc:
        fail(str(exc), 2)
    if not servers:
        fail("--server: give at least one URL", 2)
    if token_file is not None:
        token_file = token_file.expanduser().resolve()
        if not token_file.is_file():
            fail(f"--token-file {token_file}: no such file", 2)
    data = _load()
    data["contexts"][name] = {
        "servers": servers,
        "token_file": str(token_file) if token_file else None,
    }
    if use or not data.get("current"):
        data["current"] = name
    path = config.save(data)
    current = " (current)" if data["current"] == name else ""
    say("context ", (name, "bold"), f"{current}: ", (", ".join(servers), ""), f" in {path}")


@context_app.command("use")
def use(name: str = typer.Argument(..., help="context name")) -> None:
    """Make NAME the current context."""
    data = _load()
    if name not in data["contexts"]:
        known = ", ".join(sorted(data["contexts"])) or "none yet: corral context add"
        fail(f"no context {name!r} (known: {known})", 2)
    data["current"] = name
    config.save(data)
    say("now using context ", (name, "bold"))


@context_app.command("list")
def list_(output: str | None = OutputOpt, as_json: bool = JsonOpt) -> None:
    """The contexts; * marks the current one."""
    fmt = output_format(output, as_json)
    data = _load()
    rows = [
        {"name": n, "current": n == data.get("current"), **c}
        for n, c in sorted(data["contexts"].items())
    ]
    if print_data(rows, fmt):
        return
    table(
        None,
        [
            Col("CURRENT", keep=90),
            Col("NAME", keep=100),
            Col("SERVERS", keep=80, shrink=16),
            Col("TOKEN FILE", keep=50, shrink=12),
        ],
        [
            ("*" if r["current"] else "", r["name"], ", ".join(r["servers"]), r["token_file"])
            for r in rows
        ],
        empty="no contexts: corral context add NAME --server URL --token-file FILE",
        fmt=fmt,
    )


@context_app.command("remove")
def remove(name: str = typer.Argument(..., help="context name")) -> None:
    """Forget a context."""
    data = _load()
    if data["contexts"].pop(name, None) is None:
        fail(f"no context {name!r}", 2)
    if data.get("current") == name:
        data["current"] = None
    config.save(data)
    say("removed context ", (name, "bold"))
