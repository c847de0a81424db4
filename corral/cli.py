"""The `corral` entry point: user commands plus the daemons (server, agent, up)."""

from __future__ import annotations

from corral.agent.cli import agent
from corral.client import (  # noqa: F401  (register their commands)
    components_cli,
    data_cli,
    tokens_cli,
)
from corral.client.cli import app
from corral.server import cli as server_cli
from corral.server.cli import server
from corral.up import up
from corral.wiring import plug_backends

server_cli.PREPARE.append(plug_backends)

app.command(name="up")(up)
app.command(name="server")(server)
app.command(name="agent")(agent)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
