"""`corral tokens`: list credentials, rotate the admin or join token, revoke one."""

from __future__ import annotations

import sys

import typer

from corral.client.cli import JsonOpt, ServerOpt, TokenOpt, app, client, fail
from corral.client.render import ago, print_json, say, table

tokens_app = typer.Typer(
    help="Credentials: the admin token (people), the join token (new agents) and one "
    "credential per instance. Without a subcommand: list them (never their secrets).",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(tokens_app, name="tokens")


@tokens_app.callback()
def tokens_list(
    ctx: typer.Context,
    all: bool = typer.Option(False, "--all", "-a", help="include revoked tokens"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    if ctx.invoked_subcommand is not None:
        return None
    with client(server, token) as c:
        rows = c.tokens()
    if as_json:
        return print_json(rows)
    shown = [t for t in rows if all or t.revoked_at is None]
    table(
        None,
        ["ID", "KIND", "INSTANCE", "CREATED", "LAST USED", "REVOKED", "NOTE"],
        [
            (
                t.id,
                t.kind,
                t.instance_id,
                ago(t.created_at),
                ago(t.last_used_at) if t.last_used_at else "never",
                ago(t.revoked_at) if t.revoked_at else "",
                t.note,
            )
            for t in shown
        ],
        empty="no tokens",
    )


@tokens_app.command("rotate")
def tokens_rotate(
    kind: str = typer.Argument(..., help="admin or join"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Replace the admin or join token. The old one stops working at once; the new one
    is printed this once (and written to the server's DATA_DIR/KIND.token)."""
    if kind not in ("admin", "join"):
        fail(f"KIND must be admin or join, not {kind!r}", 2)
    with client(server, token) as c:
        rotated = c.rotate_token(kind)
    say(
        f"{kind} token rotated: {rotated.revoked} old token(s) revoked; the new one ",
        ("(" + rotated.id + ")", ""),
        " is below and is not shown again",
        err=True,
    )
    sys.stdout.write(rotated.secret + "\n")


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: str = typer.Argument(..., metavar="ID", help="a token id from `corral tokens`"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Revoke one credential at once (an agent whose credential is revoked exits)."""
    with client(server, token) as c:
        t = c.revoke_token(token_id)
    say((t.kind, ""), " token ", (t.id, ""), " revoked", err=True)
