"""`corral agent`: the daemon that runs on every instance."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from pathlib import Path

import typer

from corral import default_data_dir, logsetup
from corral.agent.daemon import Agent, AgentConfig
from corral.api import NAME_PATTERN


def default_name() -> str:
    name = re.sub(r"[^a-z0-9._-]", "-", socket.gethostname().lower()).strip("-._")
    return (name or "agent")[:63]


def _self_test(value: bool) -> None:
    if value:
        from corral.agent.selfupdate import SELF_TEST_OK

        typer.echo(SELF_TEST_OK)
        raise typer.Exit(0)


def agent(
    self_test: bool = typer.Option(
        False,
        "--self-test",
        is_eager=True,
        callback=_self_test,
        hidden=True,
        help="check this build can run, and exit",
    ),
    server: list[str] = typer.Option(
        ..., "--server", envvar="CORRAL_SERVER", help="server URL (repeat for failover)"
    ),
    join_token: str | None = typer.Option(
        None,
        "--join-token",
        envvar="CORRAL_JOIN_TOKEN",
        help="the server's join token (first start only)",
    ),
    join_token_file: Path | None = typer.Option(
        None,
        "--join-token-file",
        help="read the join token from this file (keep it 0600), not from the command line",
    ),
    data_dir: Path = typer.Option(
        None, "--data-dir", help="agent state: identity, attempts (default ~/.corral/agent)"
    ),
    name: str | None = typer.Option(None, help="instance name (default: host name)"),
    fleet: str | None = typer.Option(None, help="fleet this instance belongs to"),
    cpus: float | None = typer.Option(None, help="cpus to offer (default: all)"),
    memory: int | None = typer.Option(None, help="memory to offer in MB (default: all)"),
    exit_with_parent: bool = typer.Option(False, hidden=True),
    switch_timeout: float = typer.Option(
        60.0, hidden=True, help="seconds a new agent build has to heartbeat"
    ),
    peer_host: str = typer.Option(
        "127.0.0.1",
        help="address the peer data endpoint listens on (0.0.0.0 for a multi-host fleet)",
    ),
    peer_port: int = typer.Option(0, help="its port (0: any free port)"),
    peer_url: str | None = typer.Option(
        None, help="how other agents reach it, if not http://PEER_HOST:PORT"
    ),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
) -> None:
    """Run the agent: register with the server, run the job attempts it is given.

    Exit codes: 0 stopped, 2 bad configuration, 3 retired (a supervisor must not
    restart it; the data dir holds a tombstone).
    """
    logsetup.setup(log_level)

    if join_token_file is not None:
        try:
            join_token = join_token_file.read_text().strip() or None
        except OSError as exc:  # needed only before the first registration
            typer.echo(f"warning: --join-token-file {join_token_file}: {exc.strerror}", err=True)
    name = name or default_name()
    if not re.match(NAME_PATTERN, name):
        raise typer.BadParameter(f"--name {name!r}: use lowercase letters, digits, . _ -")
    config = AgentConfig(
        servers=[s for url in server for s in url.split(",") if s],
        data_dir=(data_dir or default_data_dir() / "agent").expanduser().resolve(),
        name=name,
        join_token=join_token,
        join_token_file=join_token_file,
        fleet=fleet,
        exit_with_parent=exit_with_parent,
        log_level=log_level,
        switch_timeout=switch_timeout,
        peer_host=peer_host,
        peer_port=peer_port,
        peer_url=peer_url,
    )
    if cpus is not None:
        config.cpus = cpus
    if memory is not None:
        config.memory_mb = memory
    config.data_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> int:
        a = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, a.stop)
        return await a.run()

    raise typer.Exit(asyncio.run(main()))
