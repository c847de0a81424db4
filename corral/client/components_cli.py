"""`corral components`, `corral rollout`, `corral rollouts`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from corral.client.cli import JsonOpt, ServerOpt, TokenOpt, app, client, fail
from corral.client.render import ago, console, print_json, styled, table
from corral.client.sdk import CorralError

components_app = typer.Typer(
    help="Components: versioned artifacts every agent keeps installed (the runner, the "
    "agent itself, your own tools). Without a subcommand: list them and where "
    "each instance stands.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(components_app, name="components")


@components_app.callback()
def components_list(
    ctx: typer.Context,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    if ctx.invoked_subcommand is not None:
        return None
    with client(server, token) as c:
        published, status = c.components(), c.component_status()
    if as_json:
        return print_json(
            {
                "components": [p.model_dump() for p in published],
                "instances": [s.model_dump() for s in status],
            }
        )
    table(
        "published",
        ["NAME", "VERSION", "SCHEME", "SHA256", "SIZE", "URL", "PUBLISHED"],
        [
            (p.name, p.version, p.scheme, p.sha256[:12] + "…", p.size, p.url, ago(p.created_at))
            for p in published
        ],
        empty="no components published: corral components publish NAME VERSION --url ...",
    )
    if status:
        table(
            "on instances",
            ["INSTANCE", "COMPONENT", "INSTALLED", "TARGET", "STATE", "ORDERS", "LAST ERROR"],
            [
                (
                    s.instance_name,
                    s.component,
                    s.observed_version,
                    s.target_version,
                    styled(s.state),
                    f"{s.attempts} ({s.orders_total} total)",
                    s.last_error,
                )
                for s in status
            ],
        )


@components_app.command("publish")
def publish(
    name: str = typer.Argument(..., help="component name, e.g. runner"),
    version: str = typer.Argument(..., help="1.2.3, 1.2.3-rc.1, main.1234 or dev-..."),
    url: str | None = typer.Option(None, help="where agents download it"),
    sha256: str | None = typer.Option(None, help="its sha256 (64 hex digits)"),
    size: int | None = typer.Option(None, help="its size in bytes"),
    file: Path | None = typer.Option(
        None,
        "--file",
        exists=True,
        dir_okay=False,
        help="upload this file to the server instead of --url",
    ),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Record a component version: an artifact URL and its sha256 (or --file to let
    the server store it). Versions are immutable."""
    if (file is None) == (url is None):
        fail("give exactly one of --url (with --sha256) or --file", 2)
    with client(server, token) as c:
        try:
            if file is not None:
                total = file.stat().st_size
                with Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    transient=True,
                ) as bar:
                    task = bar.add_task(f"uploading {file.name}", total=total)
                    stored = c.upload(file, on_progress=lambda n: bar.advance(task, n))
                url, sha256, size = stored["url"], stored["sha256"], stored["size"]
            elif not sha256 or not url:
                fail("--url needs --sha256", 2)
            comp = c.publish(name, version, url, sha256, size)
        except CorralError as exc:
            fail(exc.message)
        except ValueError as exc:
            fail(str(exc), 2)
    console.print(
        f"published {comp.name} {comp.version} ({comp.scheme}), sha256 {comp.sha256[:12]}…",
        highlight=False,
    )


@app.command()
def rollout(
    name: str = typer.Argument(..., help="component name"),
    version: str | None = typer.Argument(None, help="version to roll out"),
    fleet: str | None = typer.Option(
        None, help="only this fleet (default: every fleet without a rollout of its own)"
    ),
    max_unavailable: int = typer.Option(1, help="instances installing at once"),
    failure_threshold: int = typer.Option(0, help="pause once more instances than this fail"),
    downgrade: bool = typer.Option(False, help="allow a lower version than the current one"),
    force: bool = typer.Option(
        False,
        help="allow a version of another scheme or channel, or a lower one; with the "
        "version already desired: order it again where it is held",
    ),
    rollback: bool = typer.Option(
        False, "--rollback", help="return to the version before the last rollout"
    ),
    resume: int | None = typer.Option(None, "--resume", help="resume paused rollout ID"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Set the desired version of a component; agents converge on it in batches.

    Examples: corral rollout runner 1.4.0 --max-unavailable 5;
    corral rollout runner --rollback; corral rollout runner --resume 7
    """
    chosen = sum([version is not None, rollback, resume is not None])
    if chosen != 1:
        fail("give a VERSION, or --rollback, or --resume ID", 2)
    with client(server, token) as c:
        if rollback:
            r = c.rollback(name, fleet)
        elif resume is not None:
            r = c.resume_rollout(resume)
        else:
            r = c.rollout(
                name,
                version or "",
                fleet=fleet,
                max_unavailable=max_unavailable,
                failure_threshold=failure_threshold,
                downgrade=downgrade,
                force=force,
            )
    if as_json:
        return print_json(r)
    where = "every fleet" if r.fleet == "*" else f"fleet {r.fleet}"
    console.print(
        f"rollout {r.id}: {r.component} {r.previous_version or '(none)'} -> "
        f"{r.version} on {where}: {styled(r.state)}",
        highlight=False,
    )


@app.command()
def rollouts(
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Rollouts, newest first, with their progress."""
    with client(server, token) as c:
        rows = c.rollouts()
    if as_json:
        return print_json(rows)
    table(
        None,
        ["ID", "COMPONENT", "FROM", "TO", "FLEET", "STATE", "PROGRESS", "MESSAGE"],
        [
            (
                r.id,
                r.component,
                r.previous_version,
                r.version,
                r.fleet,
                styled(r.state),
                f"{r.progress.converged}/{r.progress.total} done, {r.progress.in_flight} "
                f"installing, {r.progress.failed} failed, {r.progress.held} held",
                r.message,
            )
            for r in rows
        ],
        empty="no rollouts yet: corral rollout NAME VERSION",
    )
