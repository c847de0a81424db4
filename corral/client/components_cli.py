"""`corral components`, `corral rollout`, `corral rollouts`."""

from __future__ import annotations

from pathlib import Path

import typer

from corral.client.cli import (
    CountOpt,
    IntervalOpt,
    JsonOpt,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    WatchOpt,
    _show,
    app,
    client,
    fail,
)
from corral.client.render import (
    Col,
    ago,
    output_format,
    print_data,
    render_table,
    say,
    styled,
    table,
    transfer_bar,
)

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
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    fmt = output_format(output, as_json)
    with client(server, token) as c:
        published, status = c.components(), c.component_status()
    if print_data({"components": published, "instances": status}, fmt):
        return
    table(
        "published",
        [
            Col("NAME", keep=100),
            Col("VERSION", keep=90),
            Col("SCHEME", keep=30),
            Col("SHA256", keep=40),
            Col("SIZE", keep=35),
            Col("URL", keep=50, shrink=16),
            Col("PUBLISHED", keep=60),
        ],
        [
            (
                p.name,
                p.version,
                p.scheme,
                p.sha256 if fmt == "wide" else p.sha256[:12] + "…",
                p.size,
                p.url,
                ago(p.created_at),
            )
            for p in published
        ],
        empty="no components published: corral components publish NAME VERSION --url ...",
        fmt=fmt,
    )
    if status:
        table(
            "on instances",
            [
                Col("INSTANCE", keep=100),
                Col("COMPONENT", keep=95),
                Col("INSTALLED", keep=80),
                Col("TARGET", keep=85),
                Col("STATE", keep=90),
                Col("ORDERS", keep=30),
                Col("LAST ERROR", keep=50, shrink=12),
            ],
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
            fmt=fmt,
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
    from corral.client.sdk import CorralError

    if (file is None) == (url is None):
        fail("give exactly one of --url (with --sha256) or --file", 2)
    with client(server, token) as c:
        try:
            if file is not None:
                bar, task = transfer_bar(f"uploading {file.name}", file.stat().st_size)
                with bar:
                    stored = c.upload(file, on_progress=lambda n: bar.advance(task, n))
                url, sha256, size = stored["url"], stored["sha256"], stored["size"]
            elif not sha256 or not url:
                fail("--url needs --sha256", 2)
            comp = c.publish(name, version, url, sha256, size)
        except CorralError as exc:
            fail(exc.message)
        except ValueError as exc:
            fail(str(exc), 2)
    say(
        "published ",
        (f"{comp.name} {comp.version}", ""),
        f" ({comp.scheme}), sha256 {comp.sha256[:12]}…",
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
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Set the desired version of a component; agents converge on it in batches.

    Examples: corral rollout runner 1.4.0 --max-unavailable 5;
    corral rollout runner --rollback; corral rollout runner --resume 7
    """
    fmt = output_format(output, as_json)
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
    if print_data(r, fmt):
        return
    where = "every fleet" if r.fleet == "*" else f"fleet {r.fleet}"
    say(
        f"rollout {r.id}: ",
        (f"{r.component} {r.previous_version or '(none)'} -> {r.version} on {where}", ""),
        ": ",
        styled(r.state),
    )


ROLLOUT_COLUMNS = [
    Col("ID", keep=100),
    Col("COMPONENT", keep=95),
    Col("FROM", keep=40),
    Col("TO", keep=90),
    Col("FLEET", keep=60),
    Col("STATE", keep=92),
    Col("PROGRESS", keep=70, shrink=12),
    Col("MESSAGE", keep=50, shrink=12),
]


@app.command()
def rollouts(
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    watch_: bool = WatchOpt,
    interval: float = IntervalOpt,
    count: int = CountOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Rollouts, newest first, with their progress."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:

        def draw():
            rows = c.rollouts()
            if print_data(rows, fmt):
                return None
            return render_table(
                None,
                ROLLOUT_COLUMNS,
                [
                    (
                        r.id,
                        r.component,
                        r.previous_version,
                        r.version,
                        r.fleet,
                        styled(r.state),
                        f"{r.progress.converged}/{r.progress.total} done, "
                        f"{r.progress.in_flight} installing, {r.progress.failed} failed, "
                        f"{r.progress.held} held",
                        r.message,
                    )
                    for r in rows
                ],
                empty="no rollouts yet: corral rollout NAME VERSION",
                fmt=fmt,
            )

        _show(draw, watch_, interval, count)
