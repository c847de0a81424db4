"""The `corral` user commands: jobs, logs, instances, events, servers.

Every command talks to the server's REST API through the SDK. List and show commands
take `-o table|wide|json|yaml` (`--json` is `-o json`); piped, a table is printed as
tab-separated lines. Imports are lazy: `corral --help` loads neither the SDK nor the
wire models, and no command loads the server stack.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from corral.client.render import (
    Col,
    ago,
    emit,
    output_format,
    print_data,
    render_table,
    say,
    styled,
    table,
    text,
    watch,
)
from corral.domain.jobs import FINAL_JOB_STATES

if TYPE_CHECKING:
    from corral.client.sdk import Client


app = typer.Typer(
    name="corral",
    help="corral: run batch and ML jobs on a fleet of machines.\n\n"
    "Start a local cluster with `corral up`, then submit with `corral run -- CMD`. "
    "Commands find the server through --server / CORRAL_SERVER (or a context: "
    "corral context) and authenticate with --token / CORRAL_TOKEN (default: the files "
    "`corral up` writes in ~/.corral).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

# CORRAL_SERVER / CORRAL_TOKEN are read by the SDK's config (not by Typer), so an error
# can say which of flag, environment, context or token file a bad token came from
ServerOpt = typer.Option(
    None,
    "--server",
    help="server URL; several comma-separated are tried in turn [env: CORRAL_SERVER; "
    "default: the current context, or the server `corral up` started]",
)
TokenOpt = typer.Option(
    None,
    "--token",
    help="admin token [env: CORRAL_TOKEN; default: the context's token file, or the "
    "one `corral up` wrote]",
)
JsonOpt = typer.Option(False, "--json", help="print JSON (the same as -o json)")
OutputOpt = typer.Option(
    None, "-o", "--output", help="table (default), wide (every column, uncut), json or yaml"
)
WatchOpt = typer.Option(False, "--watch", "-W", help="redraw every --interval seconds")
IntervalOpt = typer.Option(2.0, "--interval", min=0.1, help="seconds between redraws (--watch)")
CountOpt = typer.Option(0, "--count", min=0, help="stop after this many redraws (0: until Ctrl-C)")


def _version(value: bool) -> None:
    if not value:
        return
    from corral import __version__

    print(f"corral {__version__} (CLI)")
    try:
        from corral.client.sdk import Client, CorralError

        with Client(timeout=3) as c:
            h = c.health()
            print(f"server {h.get('build_version', '?')} at {c.server}")
            try:
                agents = [i.agent_version for i in c.instances() if i.agent_version]
            except CorralError:  # e.g. no valid token: the versions stay unknown
                agents = []
        for v in sorted(set(agents)):
            print(f"agent {v} on {agents.count(v)} instance(s)")
    except (CorralError, OSError, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
        say(("server not reachable: ", "dim"), (message, "dim"), err=True)
    raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_version,
        help="print the CLI version and, when one is reachable, the server's build",
    ),
    ca: Path | None = typer.Option(
        None,
        "--ca",
        envvar="CORRAL_CA",
        show_envvar=True,
        help="trust this CA (PEM) for https to the server, besides the system's",
    ),
    server: str | None = typer.Option(
        None,
        "--server",
        help="server URL for the command that follows (its own --server wins) [env: CORRAL_SERVER]",
    ),
    token: str | None = typer.Option(
        None, "--token", help="admin token for the command that follows [env: CORRAL_TOKEN]"
    ),
) -> None:
    """corral: run batch and ML jobs on a fleet of machines."""
    if ca is not None:
        os.environ["CORRAL_CA"] = str(ca.expanduser().resolve())  # what Client() reads
    if server is not None or token is not None:
        from corral.client import config as client_config

        # what the command's client uses when the command is given none of its own
        client_config.app_options.update(
            {k: v for k, v in (("server", server), ("token", token)) if v is not None}
        )


def fail(message: str, code: int = 1) -> NoReturn:
    say(("error:", "red"), " ", (message, ""), err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def client(server: str | None, token: str | None) -> Iterator[Client]:
    """A client for one command; an API error it does not handle itself ends the
    command with the server's message."""
    from corral.client.sdk import Client, CorralError

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
    from corral.domain.sizes import parse_memory_mb

    try:
        return parse_memory_mb(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_bytes(text: str, option: str) -> int:
    """'4M' is 4 MiB, '1G' 1 GiB, '512K' 512 KiB; a plain number is bytes."""
    from corral.domain import sizes

    try:
        return sizes.parse_bytes(text)
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
    name: str | None = typer.Option(None, help="a name to recognise the job by (NAME column)"),
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

    Example: corral run -w . --cpus 2 -- python3 train.py --epochs 3

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
                    lambda note: say((note, "dim"), err=True),
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
            job_id = c.submit_for_id(  # one key per invocation: its own retries make one job
                command, idempotency_key=f"cli-{uuid.uuid4().hex}", **given
            )
        except ValueError as exc:  # the spec refused by JobSubmit (checked on the client)
            fail(str(exc), 2)
        if detach:
            print(job_id)
            return
        if sys.stderr.isatty():
            say(
                (
                    f"job {job_id} submitted; following its output (Ctrl-C stops following)",
                    "dim",
                ),
                err=True,
            )
        code = _follow(c, job_id)
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


def _follow(
    c: Client,
    job_id: int,
    until_final: bool = True,
    attempt: int | None = None,
    tail: int | None = None,
) -> int:
    """Job output goes to stdout/stderr as the job wrote it (it is the job's own
    output, like `cat`); only corral's own notices are cleaned."""
    from corral.client.sdk import CorralError

    def out(stream: str, data: bytes) -> None:
        target = sys.stdout if stream == "out" else sys.stderr
        target.buffer.write(data)
        target.flush()

    def notice(message: str) -> None:
        say(("corral:", "yellow"), f" job {job_id}: ", (message, ""), err=True)

    try:
        page = c.follow(
            job_id,
            on_output=out,
            on_notice=notice,
            attempt=attempt,
            until_final=until_final,
            tail=tail,
        )
    except KeyboardInterrupt:
        say(
            f"\nstopped following; job {job_id} keeps running (corral cancel {job_id} to stop it)",
            err=True,
        )
        return 130
    except CorralError as exc:
        fail(exc.message)
    if page.job_state in FINAL_JOB_STATES and page.job_state != "succeeded":
        why = page.reason or page.job_state
        say(("corral:", "red"), f" job {job_id} {page.job_state}: ", (why, ""), err=True)
    return exit_code_of(page)


JOB_COLUMNS = [
    Col("ID", keep=100),
    Col("NAME", keep=40, shrink=8),
    Col("STATE", keep=90),
    Col("COMMAND", keep=80, shrink=12),
    Col("ATTEMPT", keep=30),
    Col("INSTANCE", keep=20),
    Col("EXIT", keep=35),
    Col("CREATED", keep=45),
    Col("FLEET", wide=True),
    Col("CPUS", wide=True),
    Col("MEMORY", wide=True),
    Col("REASON", wide=True),
]


def _job_row(j) -> list:
    return [
        j.id,
        j.name,
        styled(j.state),
        shlex.join(j.command),
        f"{j.attempt}/{j.max_attempts}",
        j.instance_id,
        j.exit_code,
        ago(j.created_at),
        j.fleet,
        f"{j.cpus:g}",
        f"{j.memory_mb} MB" if j.memory_mb else None,
        j.reason,
    ]


@app.command()
def jobs(
    state: list[str] = typer.Option([], "--state", "-s", help="filter by state (repeatable)"),
    limit: int = typer.Option(50, help="how many (newest first)"),
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    watch_: bool = WatchOpt,
    interval: float = IntervalOpt,
    count: int = CountOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """List jobs, newest first."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:

        def draw():
            rows = c.jobs(states=state or None, limit=limit)
            if print_data(rows, fmt):
                return None
            return render_table(
                None,
                JOB_COLUMNS,
                [_job_row(j) for j in rows],
                empty="no jobs yet: corral run -- echo hello",
                fmt=fmt,
            )

        _show(draw, watch_, interval, count)


def _show(draw, watching: bool, interval: float, count: int) -> None:
    """Print `draw()` once, or again and again with --watch."""
    if watching:
        watch(draw, interval, count)
        return
    emit(draw())


@app.command()
def job(
    job_id: int = typer.Argument(..., help="job id"),
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show one job: state, result, reason (why a queued job waits), every attempt."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:
        j = c.job(job_id)
    if print_data(j, fmt):
        return
    named = text(" (", (j.name, "bold"), ")") if j.name else ""
    say(text((f"job {j.id}", "bold")), named, ": ", styled(j.state))
    say("  command   ", (shlex.join(j.command), ""))
    fleet = text(", fleet ", (j.fleet, "")) if j.fleet else ""
    memory = f"{j.memory_mb} MB" if j.memory_mb else "memory not limited"
    say(f"  needs     {j.cpus:g} cpus, {memory}", fleet)
    say(f"  attempts  {j.attempt} of max {j.max_attempts}")
    if j.exit_code is not None:
        say(f"  exit code {j.exit_code} (from attempt {j.result_attempt})")
    if j.reason and j.state == "queued":  # the dispatcher's word on why it waits
        say("  waiting   ", (j.reason.removeprefix("waiting: "), "yellow"))
    elif j.reason:
        say("  reason    ", (j.reason, ""))
    for note in j.notes:
        say("  note      ", (note, ""))
    if j.workdir:
        say("  workdir   ", (j.workdir[:16] + "…", ""))
    if j.secret_env:  # names only: the server never returns the values
        say("  secrets   ", (", ".join(j.secret_env), ""), " (values sealed)")
    say(
        f"  created   {ago(j.created_at)}; started {ago(j.started_at)}; "
        f"finished {ago(j.finished_at)}"
    )
    if j.attempts:
        table(
            None,
            [
                Col("ATTEMPT", keep=100),
                Col("STATE", keep=90),
                Col("INSTANCE", keep=60),
                Col("EXIT", keep=80),
                Col("CPU", keep=30),
                Col("PEAK MEM", keep=30),
                Col("LIMITS", keep=20, shrink=8),
                Col("REASON", keep=70, shrink=12),
            ],
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
            fmt=fmt,
        )


@app.command()
def logs(
    job_id: int = typer.Argument(..., help="job id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends"),
    tail: int | None = typer.Option(
        None, "--tail", "-n", min=0, help="start with only the last N lines"
    ),
    attempt: int | None = typer.Option(None, help="an earlier attempt's output"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Print a job's output (stdout to stdout, stderr to stderr)."""
    with client(server, token) as c:
        code = _follow(c, job_id, until_final=follow, attempt=attempt, tail=tail)
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
    say(f"job {j.id} ", styled(j.state))


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
    say(f"job {j.id} ", styled(j.state), f" (attempt {j.attempt} revoked)")


INSTANCE_COLUMNS = [
    Col("NAME", keep=100),
    Col("ID", keep=30),
    Col("FLEET", keep=50),
    Col("STATE", keep=90),
    Col("CPUS", keep=40),
    Col("MEMORY", keep=35),
    Col("ATTEMPTS", keep=60),
    Col("HEARTBEAT", keep=70),
    Col("SANDBOX", keep=10, shrink=8),
    Col("PROVISION", keep=20, shrink=12),
    Col("HOST", wide=True),
    Col("AGENT", wide=True),
    Col("MESSAGE", wide=True),
]


def _instance_row(i) -> list:
    state = styled(i.state)
    if i.lost:
        state.append(" lost", style="red")
    return [
        i.name,
        i.id,
        i.fleet,
        state,
        f"{i.cpus:g}",
        f"{i.memory_mb} MB",
        i.running_attempts,
        ago(i.last_heartbeat_at),
        i.sandbox,
        provisioning(i),
        i.host,
        i.agent_version,
        i.message,
    ]


@app.command()
def instances(
    all: bool = typer.Option(False, "--all", "-a", help="include terminated instances"),
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    watch_: bool = WatchOpt,
    interval: float = IntervalOpt,
    count: int = CountOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """List the fleet's instances."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:

        def draw():
            rows = c.instances(include_terminated=all)
            if print_data(rows, fmt):
                return None
            return render_table(
                None,
                INSTANCE_COLUMNS,
                [_instance_row(i) for i in rows],
                empty="no instances: start some with `corral up --agents N` or `corral agent`",
                fmt=fmt,
            )

        _show(draw, watch_, interval, count)


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
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """What the control plane decided and why (requeues, lost instances, warnings).

    With -o json and -f, one JSON object per line."""
    from corral.client.sdk import CorralError

    fmt = output_format(output, as_json)
    with client(server, token) as c:
        try:
            rows = c.events(level=level, limit=limit, job=job_id)
            if not follow and print_data(rows, fmt):
                return
            for e in rows:
                _print_event(e, fmt)
            after = rows[-1].id if rows else 0
            while follow:
                rows = c.events(level=level, after=after, wait=20, job=job_id)
                for e in rows:
                    _print_event(e, fmt)
                    after = e.id
        except CorralError as exc:
            fail(exc.message)
        except KeyboardInterrupt:
            return


def _print_event(e, fmt: str) -> None:
    if fmt in ("json", "yaml"):
        sys.stdout.write(e.model_dump_json() + "\n")
        sys.stdout.flush()
        return
    say(
        (f"{ago(e.ts):>9}", "dim"),
        " ",
        styled(e.level),
        " " * max(1, 8 - len(e.level)),
        (e.kind, "bold"),
        " ",
        (e.message, ""),
    )


@app.command()
def servers(
    all: bool = typer.Option(False, "--all", "-a", help="include servers stopped long ago"),
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """The API servers sharing this database, with their builds."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:
        rows = c.servers(include_stopped=all)
    if print_data(rows, fmt):
        return
    builds = {s.build_version for s in rows if s.alive}
    table(
        None,
        [
            Col("ID", keep=100),
            Col("BUILD", keep=90),
            Col("HOST", keep=50, shrink=8),
            Col("PID", keep=20),
            Col("URL", keep=60, shrink=12),
            Col("STARTED", keep=30),
            Col("LAST SEEN", keep=70),
            Col("ALIVE", keep=80),
        ],
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
        fmt=fmt,
    )
    if len(builds) > 1:
        say(
            ("warning:", "yellow"),
            " servers of different builds are running: ",
            (", ".join(sorted(builds)), ""),
            err=True,
        )
