"""`corral agent`: the daemon that runs on every instance."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
from pathlib import Path

import typer

from corral import default_data_dir, logsetup
from corral.agent.daemon import Agent, AgentConfig
from corral.agent.datadir_lock import DataDirInUse, lock_data_dir
from corral.api import NAME_PATTERN
from corral.domain.sandbox import (
    DEFAULT_JOB_NETWORK,
    DEFAULT_JOB_USER,
    DEFAULT_MAX_PIDS,
    JOB_NETWORKS,
)


def default_name() -> str:
    name = re.sub(r"[^a-z0-9._-]", "-", socket.gethostname().lower()).strip("-._")
    return (name or "agent")[:63]


def read_token_file(path: Path) -> str | None:
    """A token from a file only its owner can read. A missing file is only a warning:
    the token is needed before the first registration alone (an agent that re-executes
    into a new build keeps the option, and an install may have removed the file)."""
    try:
        st = path.stat()
        token = path.read_text().strip()
    except FileNotFoundError:
        typer.echo(f"warning: --join-token-file {path}: no such file", err=True)
        return None
    except OSError as exc:
        raise typer.BadParameter(f"--join-token-file {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise typer.BadParameter(
            f"--join-token-file {path} is readable by others (mode {st.st_mode & 0o777:o}); "
            f"chmod 600 {path}"
        )
    if not token:
        raise typer.BadParameter(f"--join-token-file {path} is empty")
    return token


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
        help="the server's join token (first start only); prefer --join-token-file: a "
        "command line is visible to every process on the host",
    ),
    join_token_file: Path | None = typer.Option(
        None,
        "--join-token-file",
        help="a file (mode 0600) holding the server's join token (first start only)",
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
    job_user: str = typer.Option(
        DEFAULT_JOB_USER,
        help="when the agent runs as root, jobs run as this user (created if missing)",
    ),
    jobs_dir: Path | None = typer.Option(
        None,
        help="where attempts' private directories go (default: a root-owned 0711 "
        "directory in /var/tmp for a root agent, DATA_DIR/jobs otherwise)",
    ),
    hide: list[Path] = typer.Option(
        [], "--hide", help="a path jobs must not see (namespaces; repeatable)"
    ),
    max_pids: int = typer.Option(
        DEFAULT_MAX_PIDS,
        min=0,
        help="processes and threads one attempt may have at once (its pids cgroup; 0: "
        "only the cap on all attempts together, half of the host's pid_max)",
    ),
    job_network: str = typer.Option(
        DEFAULT_JOB_NETWORK,
        help="a root agent's jobs: 'isolated' (a network namespace each: their own "
        "loopback, other machines through this host's NAT, never this host's own "
        "addresses) or 'host' (this host's network, everything listening on it in reach)",
    ),
    disk_reserve: int | None = typer.Option(
        None,
        min=0,
        help="MB kept free on the filesystem of the jobs' directories: below it, the "
        "attempt holding the most there (its directory and its user's files in /tmp) is "
        "killed and fails saying so (default: 5% of that filesystem, at most 2048; 0: off)",
    ),
    ca: Path | None = typer.Option(
        None,
        "--ca",
        envvar="CORRAL_CA",
        help="trust this CA (PEM) for https to the servers, besides the system's",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
) -> None:
    """Run the agent: register with the server, run the job attempts it is given.

    Exit codes: 0 stopped, 2 bad configuration, 3 retired (a supervisor must not
    restart it; the data dir holds a tombstone).
    """
    logsetup.setup(log_level)
    os.umask(0o077)  # nothing the agent writes is for anyone else (jobs included)
    os.environ.pop("CORRAL_JOIN_TOKEN", None)  # read; never inherited by what it starts
    if ca is not None:
        ca = ca.expanduser().resolve()
        if not ca.is_file():
            raise typer.BadParameter(f"--ca {ca}: no such file")
        try:
            ssl.create_default_context().load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise typer.BadParameter(f"--ca {ca}: not a PEM CA certificate ({exc})") from None
        os.environ["CORRAL_CA"] = str(ca)  # runners and a re-executed build inherit it
    if job_network not in JOB_NETWORKS:
        raise typer.BadParameter(f"--job-network {job_network!r}: use {' or '.join(JOB_NETWORKS)}")
    if join_token_file is not None:
        join_token = read_token_file(join_token_file)
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
        job_user=job_user,
        jobs_dir=jobs_dir.expanduser().resolve() if jobs_dir else None,
        hide=[
            p.expanduser().resolve()
            for p in [*hide, *([join_token_file] if join_token_file else [])]
        ],
        max_pids=max_pids,
        job_network=job_network,
        disk_reserve_mb=disk_reserve,
    )
    if cpus is not None:
        config.cpus = cpus
    if memory is not None:
        config.memory_mb = memory
    config.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock_fd = lock_data_dir(config.data_dir)  # held until this process ends
    except (DataDirInUse, OSError) as exc:
        logging.getLogger("corral.agent").error("%s", exc)
        raise typer.Exit(2) from None

    async def main() -> int:
        a = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, a.stop)
        return await a.run()

    try:
        code = asyncio.run(main())
    finally:
        os.close(lock_fd)
    raise typer.Exit(code)
