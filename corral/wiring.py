"""Instance providers plugged into a server (a composition root: the server may not
import corral.backends, so `corral server` and `corral up` get them from here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.server.context import ServerContext

if TYPE_CHECKING:
    from corral.backends.ssh import SshBackend


def ssh_backend(ctx: ServerContext) -> SshBackend:
    """The ssh backend of this server: it runs the server's own bootstrap script on
    its hosts, with the server's current join token, and records host keys seen on
    first contact in DATA_DIR/known_hosts."""
    from corral.backends.ssh import SshBackend  # asyncssh: only in servers, not the CLI
    from corral.server.api.bootstrap import render

    async def script(fleet: str | None) -> str:
        return await render(ctx, fleet)

    return SshBackend(
        known_hosts=ctx.config.data_dir / "known_hosts",
        join_token=lambda: ctx.join_token,
        script=script,
    )


async def plug_backends(ctx: ServerContext) -> None:
    """What `corral server` provisions with: SSH fleets (nothing happens until a fleet
    with `backend: ssh` is applied)."""
    ctx.backends.setdefault("ssh", ssh_backend(ctx))
