"""The `corral` user commands: jobs, logs, instances, events, servers.

Every command talks to the server's REST API through the SDK; `--json` prints what
the API returned, for scripts.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import typer

from corral.api import common
from corral.api.common import parse_memory_mb
from corral.client.render import ago, console, err_console, print_json, styled, table
from corral.client.sdk import Client, CorralError
from corral.domain.jobs import FINAL_JOB_STATES

app = typer.Typer(
    name="corral",
    help="corral: run batch and ML jobs on a fleet of machines.\n\n"
    "Start a local cluster with `corral up`, then submit with `corral run -- CMD`. "
    "Commands find the server through --server / CORRAL_SERVER and authenticate with "
    "--token / CORRAL_TOKEN (default: the files `corral up` writes in ~/.corral).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

ServerOpt = typer.Option(
    None, "--server", envvar="CORRAL_SERVER", help="server URL", show_envvar=True
)
TokenOpt = typer.Option(
    None, "--token", envvar="CORRAL_TOKEN", help="admin token", show_envvar=True
)
JsonOpt = typer.Option(False, "--json", help="print JSON instead of a table")


@app.callback()
def _global(
    ca: Path | None = typer.Option(
        None,
        "--ca",
        envvar="CORRAL_CA",
        show_envvar=True,
        help="trust this CA (PEM) for https to the server, besides the system's",
    ),
) -> None:
    """corral: run batch and ML jobs on a fleet of machines."""
    if ca is not None:
        os.environ["CORRAL_CA"] = str(ca.expanduser().resolve())  # what Client() reads


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def client(server: str | None, token: str | None) -> Iterator[Client]:
    """A client for one command; an API error it does not handle itself ends the
    command with the server's message."""
    try:
        c = Client(server=server, token=token)
    except CorralError as exc:  # e.g. a CA file that cannot be loaded
        fail(exc.message)
    with c:
        try:
            yield c
        except CorralError as exc:
            fail(exc.message)


def parse_memory(text: str) -> int:
    """'512' and '512M' are megabytes; '2G' is 2048 MB; '1.5GiB' is 1536 MB."""
    try:
        return parse_memory_mb(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_bytes(text: str, option: str) -> int:
    """'4M' is 4 MiB, '1G' 1 GiB, '512K' 512 KiB; a plain number is bytes."""
    try:
        return common.parse_bytes(text)
    except ValueError as exc:
        fail(f"{option} {exc}", 2)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments, blank lines, `export`, quotes: dotenv's syntax)."""
    from dotenv import dotenv_values

    if not path.is_file():
        fail(f"--env-file {path}: no such file", 2)
    out = {}
    for key, value in dotenv_values(path).items():
        if value is None:
            fail(f"--env-file {path}: {key} has no value (expected KEY=VALUE)", 2)
        out[key] = value
    return out


def exit_code_of(job) -> int:
    if job.job_state == "succeeded":
        return 0
    if job.exit_code is not None:
        return job.exit_code
    return 1


@app.command(
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
def run(
    command: list[str] = typer.Argument(..., help="the command and its arguments (after --)"),
    fleet: str | None = typer.Option(None, help="run only on this fleet's instances"),
    cpus: float = typer.Option(1.0, help="cpus the job needs"),
    memory: str | None = typer.Option(None, help="memory the job needs, e.g. 512M, 2G"),
    max_attempts: int = typer.Option(3, help="attempts before the job fails for good"),
    name: str | None = typer.Option(None, help="a name to recognise the job by"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE for the job (repeatable)"),
    secret: list[str] = typer.Option(
        [],
        "--secret",
        help="KEY=VALUE for the job, kept sealed by the server and never shown (repeatable)",
    ),
    inputs: list[str] = typer.Option(
        [],
        "--input",
        "-i",
        help="object id (from corral put) the job reads from $CORRAL_INPUT_DIR (repeatable)",
    ),
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        "-w",
        help="ship this directory (minus .gitignore/.corralignore) as the job's working "
        "directory, $CORRAL_WORKDIR",
    ),
    workdir_limit: str = typer.Option("100M", help="refuse a --workdir bigger than this"),
    env_file: list[Path] = typer.Option(
        [], "--env-file", help="KEY=VALUE lines for the job (repeatable; -e wins)"
    ),
    log_limit: str | None = typer.Option(
        None, help="output kept per attempt, e.g. 64M (the default); the job goes on past it"
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="print the job id and return"),
    array: str | None = typer.Option(
        None,
        "--array",
        help="submit tasks A..B of this command (e.g. 1-100), each with its index in "
        "$CORRAL_ARRAY_INDEX; prints the job ids and returns",
    ),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Submit a job. Without --detach, stream its output and exit with its exit code.

    Example: corral run -w . --cpus 2 -- python train.py --epochs 3

    -w ships your code: the job starts in a private copy of DIR (uploaded once; an
    unchanged tree is not uploaded again). Files the job writes to $CORRAL_OUTPUT_DIR
    become its outputs (corral outputs ID).

    Ctrl-C stops following; the job keeps running (cancel it with `corral cancel ID`).
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        fail("no command given: corral run -- CMD [ARGS...]", 2)
    envs = {}
    for f in env_file:
        envs.update(read_env_file(f))
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--env {item!r}: expected KEY=VALUE", 2)
        envs[key] = value
    secrets = {}
    for item in secret:
        key, sep, value = item.partition("=")
        if not sep or not key:  # never echo the value: it is a secret
            fail(f"--secret {key if sep else '...'}: expected KEY=VALUE", 2)
        secrets[key] = value
        envs.pop(key, None)  # --secret wins over -e/--env-file
    options: dict = dict(
        fleet=fleet, cpus=cpus, max_attempts=max_attempts, name=name, env=envs, inputs=inputs
    )
    if secrets:
        options["secret_env"] = secrets
    if memory is not None:
        options["memory_mb"] = parse_memory(memory)
    if log_limit is not None:
        options["log_limit"] = parse_bytes(log_limit, "--log-limit")
    with client(server, token) as c:
        if workdir is not None:
            from corral.client.workdir import WorkdirError, ship

            try:
                options["workdir"] = ship(
                    c,
                    workdir,
                    parse_bytes(workdir_limit, "--workdir-limit"),
                    lambda note: err_console.print(f"[dim]{note}[/dim]", highlight=False),
                )
            except (WorkdirError, OSError) as exc:
                fail(str(exc), 2)
        given = {k: v for k, v in options.items() if v is not None}
        if array is not None:
            first, last = parse_array(array)
            try:
                ids = c.submit_array(command, first, last, **given)
            except ValueError as exc:
                fail(str(exc), 2)
            print("\n".join(map(str, ids)))
            return
        try:
            job = c.submit(  # one key per invocation: its own retries make one job
                command, idempotency_key=f"cli-{uuid.uuid4().hex}", **given
            )
        except ValueError as exc:  # pydantic validation on the client side
            fail(str(exc), 2)
        if detach:
            print(job.id)
            return
        if sys.stderr.isatty():
            err_console.print(
                f"[dim]job {job.id} submitted; following its output (Ctrl-C stops following)[/dim]"
            )
        code = _follow(c, job.id)
    raise typer.Exit(code)


def parse_array(spec: str) -> tuple[int, int]:
    """`A-B` (or `N`, meaning 1-N): the first and last task index."""
    a, sep, b = spec.partition("-")
    try:
        first, last = (int(a), int(b)) if sep else (1, int(a))
    except ValueError:
        fail(f"--array {spec!r}: expected A-B, e.g. 1-100", 2)
    if first < 0 or last < first:
        fail(f"--array {spec!r}: expected 0 <= A <= B", 2)
    if last - first + 1 > 100_000:
        fail(f"--array {spec!r}: at most 100000 tasks", 2)
    return first, last


def _follow(c: Client, job_id: int, until_final: bool = True, attempt: int | None = None) -> int:
    def out(stream: str, data: bytes) -> None:
        target = sys.stdout if stream == "out" else sys.stderr
        target.buffer.write(data)
        target.flush()

    def notice(text: str) -> None:
        err_console.print(f"[yellow]corral:[/yellow] job {job_id}: {text}", highlight=False)

    try:
        page = c.follow(
            job_id, on_output=out, on_notice=notice, attempt=attempt, until_final=until_final
        )
    except KeyboardInterrupt:
        err_console.print(
            f"\nstopped following; job {job_id} keeps running (corral cancel {job_id} to stop it)"
        )
        return 130
    except CorralError as exc:
        fail(exc.message)
    if page.job_state in FINAL_JOB_STATES and page.job_state != "succeeded":
        why = page.reason or page.job_state
        err_console.print(
            f"[red]corral:[/red] job {job_id} {page.job_state}: {why}", highlight=False
        )
    return exit_code_of(page)


@app.command()
def jobs(
    state: list[str] = typer.Option([], "--state", "-s", help="filter by state (repeatable)"),
    limit: int = typer.Option(50, help="how many (newest first)"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """List jobs, newest first."""
    with client(server, token) as c:
        rows = c.jobs(states=state or None, limit=limit)
    if as_json:
        return print_json(rows)
    table(
        None,
        ["ID", "STATE", "COMMAND", "ATTEMPT", "INSTANCE", "EXIT", "CREATED"],
        [
            (
                j.id,
                styled(j.state),
                _cmd(j.command),
                f"{j.attempt}/{j.max_attempts}",
                j.instance_id,
                j.exit_code,
                ago(j.created_at),
            )
            for j in rows
        ],
        empty="no jobs yet: corral run -- echo hello",
    )


def _cmd(argv: list[str], width: int = 60) -> str:
    text = shlex.join(argv)
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def job(
    job_id: int = typer.Argument(..., help="job id"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show one job: state, result, reason, and every attempt."""
    with client(server, token) as c:
        j = c.job(job_id)
    if as_json:
        return print_json(j)
    console.print(
        f"[bold]job {j.id}[/bold]{' (' + j.name + ')' if j.name else ''}: {styled(j.state)}"
    )
    console.print(f"  command   {shlex.join(j.command)}", highlight=False)
    console.print(
        f"  needs     {j.cpus:g} cpus, {j.memory_mb} MB" + (f", fleet {j.fleet}" if j.fleet else "")
    )
    console.print(f"  attempts  {j.attempt} of max {j.max_attempts}")
    if j.exit_code is not None:
        console.print(f"  exit code {j.exit_code} (from attempt {j.result_attempt})")
    if j.reason:
        console.print(f"  reason    {j.reason}", highlight=False)
    for note in j.notes:
        console.print(f"  note      {note}", highlight=False)
    if j.workdir:
        console.print(f"  workdir   {j.workdir[:16]}…")
    if j.secret_env:  # names only: the server never returns the values
        console.print(f"  secrets   {', '.join(j.secret_env)} (values sealed)", highlight=False)
    console.print(
        f"  created   {ago(j.created_at)}; started {ago(j.started_at)}; "
        f"finished {ago(j.finished_at)}"
    )
    if j.attempts:
        table(
            None,
            ["ATTEMPT", "STATE", "INSTANCE", "EXIT", "CPU", "PEAK MEM", "LIMITS", "REASON"],
            [
                (
                    a.number,
                    styled(a.state),
                    a.instance_id,
                    a.exit_code,
                    f"{a.cpu_seconds:.2f}s" if a.cpu_seconds is not None else None,
                    f"{a.peak_memory_mb} MB" if a.peak_memory_mb is not None else None,
                    a.limits_enforced,
                    a.reason,
                )
                for a in j.attempts
            ],
        )


@app.command()
def logs(
    job_id: int = typer.Argument(..., help="job id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends"),
    attempt: int | None = typer.Option(None, help="an earlier attempt's output"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Print a job's output (stdout to stdout, stderr to stderr)."""
    with client(server, token) as c:
        code = _follow(c, job_id, until_final=follow, attempt=attempt)
    if follow:
        raise typer.Exit(code)


@app.command()
def cancel(
    job_id: int = typer.Argument(..., help="job id"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Cancel a job; its processes (the whole tree) are killed."""
    with client(server, token) as c:
        j = c.cancel(job_id)
    console.print(f"job {j.id} {styled(j.state)}")


@app.command()
def requeue(
    job_id: int = typer.Argument(..., help="job id"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Revoke a running job's current attempt and queue it again (uses an attempt).

    The old attempt's runner can no longer change the job; its agent kills it."""
    with client(server, token) as c:
        j = c.requeue(job_id)
    console.print(f"job {j.id} {styled(j.state)} (attempt {j.attempt} revoked)")


@app.command()
def instances(
    all: bool = typer.Option(False, "--all", "-a", help="include terminated instances"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """List the fleet's instances."""
    with client(server, token) as c:
        rows = c.instances(include_terminated=all)
    if as_json:
        return print_json(rows)
    table(
        None,
        [
            "NAME",
            "ID",
            "FLEET",
            "STATE",
            "CPUS",
            "MEMORY",
            "ATTEMPTS",
            "HEARTBEAT",
            "SANDBOX",
            "PROVISION",
        ],
        [
            (
                i.name,
                i.id,
                i.fleet,
                styled(i.state) + (" [red]lost[/red]" if i.lost else ""),
                f"{i.cpus:g}",
                f"{i.memory_mb} MB",
                i.running_attempts,
                ago(i.last_heartbeat_at),
                i.sandbox,
                provisioning(i),
            )
            for i in rows
        ],
        empty="no instances: start some with `corral up --agents N` or `corral agent`",
    )


def provisioning(i) -> str:
    """Where the backend is with the instance's machine, and its last error."""
    if i.provision_state is None:
        return ""
    where = (i.backend_ref or "").removeprefix("ssh:")
    text = f"{i.provision_state} ({where})" if where else str(i.provision_state)
    if i.provision_state in ("backoff", "failed", "stop_failed") and i.provision_error:
        tries = f" after {i.provision_attempts} tries" if i.provision_attempts > 1 else ""
        text += f"{tries}: {i.provision_error}"
    return text


@app.command()
def events(
    level: str = typer.Option("info", help="minimum level: debug, info, warning, error"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events"),
    limit: int = typer.Option(50, help="how many recent events"),
    job_id: int | None = typer.Option(None, "--job", help="only this job's events"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """What the control plane decided and why (requeues, lost instances, warnings)."""
    with client(server, token) as c:
        try:
            rows = c.events(level=level, limit=limit, job=job_id)
            if as_json and not follow:
                return print_json(rows)
            for e in rows:
                _print_event(e, as_json)
            after = rows[-1].id if rows else 0
            while follow:
                rows = c.events(level=level, after=after, wait=20, job=job_id)
                for e in rows:
                    _print_event(e, as_json)
                    after = e.id
        except CorralError as exc:
            fail(exc.message)
        except KeyboardInterrupt:
            return None


def _print_event(e, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(e.model_dump_json() + "\n")
        sys.stdout.flush()
        return
    console.print(
        f"[dim]{ago(e.ts):>9}[/dim] {styled(e.level):<7} [bold]{e.kind}[/bold] {e.message}",
        highlight=False,
    )


@app.command()
def servers(
    all: bool = typer.Option(False, "--all", "-a", help="include servers stopped long ago"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """The API servers sharing this database, with their builds."""
    with client(server, token) as c:
        rows = c.servers(include_stopped=all)
    if as_json:
        return print_json(rows)
    builds = {s.build_version for s in rows if s.alive}
    table(
        None,
        ["ID", "BUILD", "HOST", "PID", "URL", "STARTED", "LAST SEEN", "ALIVE"],
        [
            (
                s.id,
                s.build_version,
                s.host,
                s.pid,
                s.url,
                ago(s.started_at),
                ago(s.last_seen_at),
                "yes" if s.alive else "no",
            )
            for s in rows
        ],
    )
    if len(builds) > 1:
        err_console.print(
            f"[yellow]warning:[/yellow] servers of different builds are running: "
            f"{', '.join(sorted(builds))}"
        )
