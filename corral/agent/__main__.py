"""`python -m corral.agent`: the agent command alone (`corral agent`), without importing
the rest of the CLI (the server, the client), so it starts sooner. An agent build that
wraps an installed corral should exec this:

    #!/bin/sh
    exec python3 -m corral.agent "$@"
"""

from __future__ import annotations

import typer

from corral.agent.cli import agent


def main() -> None:
    typer.run(agent)


if __name__ == "__main__":
    main()
