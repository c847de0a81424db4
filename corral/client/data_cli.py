"""`corral outputs`, `corral put`, `corral drain`, `corral fleets`, `corral fleet apply`,
`corral scale`."""

from __future__ import annotations

import sys
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import typer

from corral.client.cli import (
    JsonOpt,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    app,
    client,
    fail,
)
from corral.client.render import (
    Col,
    human_size,
    output_format,
    print_data,
    print_json,
    say,
    styled,
    table,
    text,
    transfer_bar,
)

if TYPE_CHECKING:
    from pydantic import ValidationError


def output_path_problem(path: str) -> str | None:
    """Why an output path from the server may not be written under a destination
    directory (it is absolute, climbs out with `..`, or names nothing), or None."""
    if not path or "\0" in path:
        return "is empty or not a path"
    pure = PurePosixPath(path)
    if pure.is_absolute() or PureWindowsPath(path).is_absolute() or path.startswith("\\"):
        return "is absolute"
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        return "climbs out with .."
    if all(p in ("", ".") for p in parts):
        return "names no file"
    return None


@app.command(context_settings={"allow_interspersed_args": True})
def outputs(
    args: list[str] = typer.Argument(
        ..., metavar="[get] JOB_ID [PATH]", help="JOB_ID lists; get JOB_ID [PATH] downloads"
    ),
    dest: str | None = typer.Option(
        None,
        "-o",
        "--output",
        help="listing: the format (table, wide, json, yaml); get: where to write (a file "
        "for one PATH, a directory otherwise; default ./job-ID/)",
    ),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """List a job's outputs, or download them (verified by sha256).

    corral outputs 42;  corral outputs get 42 -o results/;  corral outputs get 42 model.pt -o m.pt
    """
    get = args[0] == "get"
    rest = args[1:] if get else args
    if not rest or not rest[0].isdigit() or len(rest) > (2 if get else 1):
        fail("usage: corral outputs JOB_ID  |  corral outputs get JOB_ID [PATH] [-o DEST]", 2)
    job_id = int(rest[0])
    fmt = "table" if get else output_format(dest, as_json)
    with client(server, token) as c:
        files = c.outputs(job_id)
        if not get:
            if print_data(files, fmt):
                return
            table(
                None,
                [
                    Col("PATH", keep=100, shrink=16),
                    Col("SIZE", keep=80),
                    Col("SHA256", keep=50),
                    Col("COPIES", keep=60),
                    Col("STATE", keep=90),
                ],
                [
                    (
                        o.path,
                        human_size(o.size),
                        o.sha256 if fmt == "wide" else o.sha256[:16] + "…",
                        f"{o.copies} (1 durable)" if o.durable else o.copies,
                        styled(o.state),
                    )
                    for o in files
                ],
                empty=f"job {job_id} has no outputs",
                fmt=fmt,
            )
            return
        from corral.client.sdk import CorralError

        if len(rest) == 2:
            files = [o for o in files if o.path == rest[1]]
        where = dest or (Path(f"job-{job_id}") if len(rest) == 1 else Path("."))
        for o in files:  # all checked before anything is fetched or written
            if why := output_path_problem(o.path):
                fail(
                    f"job {job_id}: the server lists an output path {o.path!r} that {why}; "
                    f"it would escape {where}, so nothing was written"
                )
        if len(rest) == 2:
            if not files:
                fail(f"job {job_id} has no output {rest[1]!r} (see corral outputs {job_id})")
            target = {files[0].path: Path(dest) if dest else Path(Path(rest[1]).name)}
        else:
            base = Path(dest) if dest else Path(f"job-{job_id}")
            target = {o.path: base / PurePosixPath(o.path) for o in files}
        total = sum(o.size for o in files)
        bar, task = transfer_bar(f"job {job_id} outputs", total)
        with bar:
            for o in files:
                try:
                    c.download(o.sha256, target[o.path], lambda n: bar.advance(task, n))
                except CorralError as exc:
                    fail(f"{o.path}: {exc.message}")
    for o in files:
        say((target[o.path], ""), f"  {human_size(o.size)}  sha256 ok")


@app.command()
def put(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="file to upload"),
    name: str | None = typer.Option(None, help="its name as a job input (default: file name)"),
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Upload input data; prints its object id. It lives on the instances like job
    outputs; a job takes it with `corral run --input ID` (in $CORRAL_INPUT_DIR)."""
    with client(server, token) as c:
        bar, task = transfer_bar(f"uploading {file.name}", file.stat().st_size)
        with bar:
            obj = c.put(file, name, lambda n: bar.advance(task, n))
    if as_json:
        return print_json(obj)
    placed = [r.instance_name for r in obj.replicas if r.state == "present"]
    say(
        f"stored {human_size(obj.size)} as ",
        (obj.name, ""),
        text(" on ", (", ".join(placed), "")) if placed else " (placement pending)",
        err=True,
    )
    print(obj.sha256)


@app.command()
def drain(
    instance: str = typer.Argument(..., help="instance name or id"),
    force: bool = typer.Option(
        False,
        "--force",
        help="retire even if outputs only it holds would be lost (they are listed)",
    ),
    wait: bool = typer.Option(
        False, "--wait", help="show the copying as it goes and return once it is retired"
    ),
    timeout: float = typer.Option(0, help="with --wait: give up after this many seconds"),
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Stop giving an instance jobs, copy its unique outputs to running instances, then
    retire it. Without a place for its data it stays draining and says so."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:
        view = c.drain(instance, force=force)
        if not print_data(view, fmt):
            i = view.instance
            say(f"instance {i.name} ({i.id}) ", styled(i.state))
            if view.at_risk:
                verb = "will be LOST" if force else "only it holds (copying them first)"
                say(f"{len(view.at_risk)} object(s) {verb}:", err=force)
                for a in view.at_risk[:50]:
                    say(f"  {human_size(a.size):>9}  ", (", ".join(a.names), ""))
        if wait:
            _wait_retired(c, view, timeout)


def _wait_retired(c, view, timeout: float) -> None:
    """Poll until the instance is retired, with a bar of the bytes of its unique
    objects that now have a copy elsewhere."""
    i = view.instance
    risky = {a.sha256: a.size for a in view.at_risk[:500]}
    copied: set[str] = set()
    deadline = time.monotonic() + timeout if timeout else None
    bar, task = transfer_bar(f"draining {i.name}", sum(risky.values()) or None)
    state = i.state
    with bar:
        while state not in ("retired", "terminated"):
            if deadline and time.monotonic() > deadline:
                fail(f"instance {i.name} still {state} after {timeout:g}s", 1)
            for sha, size in risky.items():
                if sha in copied:
                    continue
                obj = c.object(sha)
                if obj.durable or any(
                    r.instance_id != i.id and r.state == "present" and r.instance_state == "running"
                    for r in obj.replicas
                ):
                    copied.add(sha)
                    bar.advance(task, size)
            now = c.instance(i.id)
            state = now.state
            bar.update(task, description=f"draining {i.name}: {state}")
            if state not in ("retired", "terminated"):
                time.sleep(1)
    say(f"instance {i.name} ", styled(state), f" ({len(copied)}/{len(risky)} object(s) copied)")


@app.command()
def undrain(
    instance: str = typer.Argument(..., help="instance name or id"),
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Stop draining an instance: it takes jobs again."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:
        i = c.undrain(instance)
    if not print_data(i, fmt):
        say(f"instance {i.name} ({i.id}) ", styled(i.state))


FLEET_COLUMNS = [
    Col("NAME", keep=100),
    Col("BACKEND", keep=60),
    Col("MIN", keep=40),
    Col("MAX", keep=40),
    Col("TARGET", keep=80),
    Col("RUNNING", keep=90),
    Col("PENDING", keep=50),
    Col("DRAINING", keep=50),
    Col("IDLE TIMEOUT", keep=20),
    Col("DURABLE", keep=10),
]


@app.command()
def fleets(
    output: str | None = OutputOpt,
    as_json: bool = JsonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Fleets: backend, size range, target, instances."""
    fmt = output_format(output, as_json)
    with client(server, token) as c:
        rows = c.fleets()
    if print_data(rows, fmt):
        return
    table(
        None,
        FLEET_COLUMNS,
        [
            (
                f.name,
                f.backend,
                f.min_size,
                f.max_size,
                f.target_size,
                f.running,
                f.pending,
                f.draining,
                f"{f.idle_timeout:g}s",
                "yes" if f.durable else "no",
            )
            for f in rows
        ],
        empty="no fleets: corral fleet apply fleet.yml",
        fmt=fmt,
    )


fleet_app = typer.Typer(
    help="Manage fleets (see `corral fleets` to list them).", no_args_is_help=True
)
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("apply")
def fleet_apply(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="fleet file (YAML)"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Create or update a fleet from a file. Every key is checked: an unknown setting
    or backend is an error naming it.

    \b
      name: gpu
      backend: local         # local (agent processes on the server's machine) or ssh
      min: 0
      max: 8
      idle_timeout: 300      # seconds before an idle instance is retired
      instance: {cpus: 4, memory: 16G}
      durable:               # optional: where outputs go when no instance can take them
        endpoint: http://127.0.0.1:9000
        bucket: corral-outputs

    \b
      name: lab              # an ssh fleet: agents on machines you already have
      backend: ssh
      min: 2
      max: 2                 # at most one instance per host
      hosts:
        - root@10.0.0.5      # [user@]host[:port], or a mapping:
        - {host: gpu-2.lan, user: ubuntu, identity_file: ~/.ssh/id_ed25519, cpus: 8}
      known_hosts: ~/.ssh/known_hosts   # optional; default DATA_DIR/known_hosts (first use)
      wipe: false            # delete an instance's data dir on its host when it retires
    """
    import yaml
    from pydantic import ValidationError

    from corral.api import FleetSpec

    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        fail(f"{file}: not valid YAML: {exc}", 2)
    if not isinstance(data, dict):
        fail(f"{file}: expected a mapping of fleet settings", 2)
    try:
        spec = FleetSpec.model_validate(data)
    except ValidationError as exc:
        fail(f"{file}: " + "; ".join(validation_errors(exc)), 2)
    with client(server, token) as c:
        f = c.apply_fleet(spec.model_dump())
    hosts = f" on {len(f.hosts)} host(s)" if f.hosts else ""
    say(
        "fleet ",
        (f.name, ""),
        f": {f.backend}, {f.min_size}..{f.max_size} instances{hosts}, target {f.target_size}",
    )


def validation_errors(exc: ValidationError) -> list[str]:
    """One line per problem, naming where it is (hosts[1].port: ...)."""
    out = []
    for e in exc.errors():
        where = ""
        for part in e.get("loc", ()):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        out.append(f"{where}: {message}" if where else message)
    return out


@app.command()
def scale(
    fleet: str = typer.Argument(..., help="fleet name"),
    size: int = typer.Argument(..., min=0, help="instances wanted"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Set a fleet's size. Shrinking drains the instances holding the least unique data
    first; none is terminated before its data has a copy elsewhere."""
    with client(server, token) as c:
        f = c.scale(fleet, size)
    say(
        "fleet ",
        (f.name, ""),
        f": target {f.target_size} ({f.running} running, {f.draining} draining)",
    )


if __name__ == "__main__":
    sys.exit(app())
