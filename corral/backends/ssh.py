"""The ssh backend: corral agents on machines that already exist, over SSH (asyncssh).

Each host of an SSH fleet is a machine in a fixed pool; the server puts an instance on
a free host and calls `create`, which connects (the host key checked), checks the OS,
Python and free disk, writes the join token to a 0600 file through the SSH channel
(never on a command line), and runs the server's own verified bootstrap script, which
installs the rolled-out agent build (sha256, self-test, atomic install) and starts it:
the systemd unit as root where systemd runs, otherwise a supervised background process
that survives the SSH session. The server then waits for the agent to register.

`terminate` (only ever after a drain) runs the same script with `--uninstall`: the agent
and its unit stop, the token file goes, and the instance's data dir is kept unless the
fleet says `wipe: true`; the host goes back to the pool. Each instance has its own data
dir on the host, so a retired instance's tombstone never stops the next one.

Host keys: a fleet's `known_hosts` file is trusted alone (an unknown host is refused);
without one, DATA_DIR/known_hosts records a host's key on first contact, and a key that
differs from the recorded one stops provisioning of that host (HOST_KEY_CHANGED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncssh

from corral.api.fleets import SshHost, SshSettings, split_target
from corral.domain.providers import Backend, Progress
from corral.domain.provisioning import FailureKind, ProvisionError, ProvisionState

log = logging.getLogger("corral.backends.ssh")

MIN_PYTHON = (3, 11)
TOKEN_FILE = "join.token"

# One round trip: what the host is, and the defaults for where things go on it.
CHECK = r"""
set -u
PY="$1"; PREFIX="$2"; DATA="$3"
if [ "$(id -u)" = 0 ]; then
    : "${PREFIX:=/usr/local/bin}"; : "${DATA:=/var/lib/corral-agent}"
else
    : "${PREFIX:=$HOME/.local/bin}"; : "${DATA:=$HOME/.local/share/corral-agent}"
fi
echo "os=$(uname -s)"
echo "prefix=$PREFIX"
echo "data=$DATA"
if command -v "$PY" >/dev/null 2>&1; then
    echo "python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
else
    echo "python=none"
fi
if command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1; then
    echo "fetch=yes"
else
    echo "fetch=no"
fi
d="$DATA"
while [ ! -d "$d" ]; do d=$(dirname "$d"); done
echo "free_kb=$(df -Pk "$d" | awk 'NR==2 {print $4}')"
"""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


class SshBackend(Backend):
    name = "ssh"

    def __init__(
        self,
        *,
        known_hosts: Path,
        join_token: Callable[[], str],
        script: Callable[[str | None], Awaitable[str]],
        connect_timeout: float = 15.0,
        command_timeout: float = 600.0,
        parallel: int = 16,
    ):
        """`known_hosts`: where keys are recorded on first contact (DATA_DIR/known_hosts);
        `join_token`: the server's current join token; `script(fleet)`: the server's
        bootstrap script for that fleet."""
        self.known_hosts = Path(known_hosts)
        self.join_token = join_token
        self.script = script
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._slots = asyncio.Semaphore(parallel)
        self._record = asyncio.Lock()

    # -- Backend -----------------------------------------------------------------------------

    def slots(self, fleet: str, spec: Mapping[str, Any]) -> list[str] | None:
        return [h.ref for h in self._settings(spec).hosts]

    async def create(
        self,
        instance_id: str,
        name: str,
        fleet: str,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
        ref: str | None = None,
        spec: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> str:
        settings = self._settings(spec or {})
        host = self._host(settings, ref)
        say = progress or _quiet
        async with self._slots:
            await say(ProvisionState.CONNECTING)
            async with self._session(host, settings) as conn:
                where = await self._check(conn, host, settings)
                await say(ProvisionState.INSTALLING)
                data = f"{where['data'].rstrip('/')}/{name}"
                token_file = f"{data}/{TOKEN_FILE}"
                await self._run(
                    conn,
                    host,
                    f"umask 077 && mkdir -p {shlex.quote(data)} && chmod 0700 "
                    f"{shlex.quote(data)} && cat > {shlex.quote(token_file)}",
                    stdin=self.join_token() + "\n",
                    what="writing the join token file",
                )
                args = [
                    "--join-token-file",
                    token_file,
                    "--prefix",
                    where["prefix"],
                    "--data-dir",
                    data,
                    "--name",
                    name,
                    "--fleet",
                    fleet,
                    "--peer-port",
                    str(host.peer_port),
                    "--peer-url",
                    host.peer_url or f"http://{_bracket(host.host)}:{host.peer_port}",
                ]
                if (host.cpus or cpus) is not None:
                    args += ["--cpus", f"{host.cpus or cpus:g}"]
                if (host.memory_mb or memory_mb) is not None:
                    args += ["--memory", str(host.memory_mb or memory_mb)]
                out = await self._run(
                    conn,
                    host,
                    "sh -s -- " + shlex.join(args),
                    stdin=await self.script(fleet),
                    what="the bootstrap script",
                    kind=FailureKind.BOOTSTRAP,
                )
        log.info("%s on %s: %s", name, _target(host), _tail(out, 1))
        return host.ref

    async def ensure(
        self,
        instance_id: str,
        name: str,
        fleet: str,
        ref: str | None,
        *,
        cpus: float | None = None,
        memory_mb: int | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        """Nothing to do: the agent's own supervisor (systemd, or the background loop)
        keeps it running on its host, whatever happens to this server."""

    async def terminate(
        self, ref: str, *, name: str | None = None, spec: Mapping[str, Any] | None = None
    ) -> None:
        if not name:
            raise ProvisionError(FailureKind.ERROR, f"{ref}: no instance name to stop")
        settings = self._settings(spec or {})
        host = self._host(settings, ref)
        async with self._slots, self._session(host, settings) as conn:
            where = await self._check(conn, host, settings, strict=False)
            args = ["--uninstall", "--data-dir", f"{where['data'].rstrip('/')}/{name}"]
            if settings.wipe:
                args.append("--wipe")
            await self._run(
                conn,
                host,
                "sh -s -- " + shlex.join(args),
                stdin=await self.script(None),
                what="stopping the agent",
            )

    # -- the fleet's settings ---------------------------------------------------------------

    @staticmethod
    def _settings(spec: Mapping[str, Any]) -> SshSettings:
        return SshSettings.model_validate(spec.get("ssh") or {"hosts": []})

    @staticmethod
    def _host(settings: SshSettings, ref: str | None) -> SshHost:
        for h in settings.hosts:
            if h.ref == ref:
                return h
        if ref and ref.startswith("ssh:"):  # a host since removed from the fleet file
            user, host, port = split_target(ref[4:])
            return SshHost(host=host, user=user or "root", port=port or 22)
        raise ProvisionError(FailureKind.ERROR, f"no host {ref!r} in the fleet")

    # -- SSH -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(
        self, host: SshHost, settings: SshSettings
    ) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """A connection whose host key is verified (see the module's docstring),
        through the host's proxy_jump if it has one; closed (with its tunnel) after."""
        opened: list[asyncssh.SSHClientConnection] = []
        try:
            tunnel = None
            if host.proxy_jump:
                user, jump_host, port = split_target(host.proxy_jump)
                jump = SshHost(
                    host=jump_host,
                    port=port or 22,
                    user=user or host.user,
                    identity_file=host.identity_file,
                    agent_forwarding=host.agent_forwarding,
                )
                tunnel = await self._connect(jump, settings, None)
                opened.append(tunnel)
            conn = await self._connect(host, settings, tunnel)
            opened.append(conn)
            yield conn
        finally:
            for c in reversed(opened):
                c.close()

    async def _connect(
        self,
        host: SshHost,
        settings: SshSettings,
        tunnel: asyncssh.SSHClientConnection | None,
    ) -> asyncssh.SSHClientConnection:
        try:
            trusted = await self._trusted_keys(host, settings, tunnel)
            return await asyncio.wait_for(
                asyncssh.connect(
                    host.host,
                    host.port,
                    username=host.user,
                    known_hosts=trusted,
                    client_keys=_client_keys(host),
                    agent_forwarding=host.agent_forwarding,
                    tunnel=tunnel or (),
                    config=None,
                    connect_timeout=self.connect_timeout,
                ),
                self.connect_timeout + 5,
            )
        except ProvisionError:
            raise
        except Exception as exc:
            raise _failure(host, exc, self._known_hosts_path(settings)) from None

    def _known_hosts_path(self, settings: SshSettings) -> Path:
        return Path(settings.known_hosts).expanduser() if settings.known_hosts else self.known_hosts

    async def _trusted_keys(
        self, host: SshHost, settings: SshSettings, tunnel: asyncssh.SSHClientConnection | None
    ) -> tuple[list, list, list]:
        """The keys this host may present: the known ones; or, on first contact with
        no fleet known_hosts, the key it presents now, recorded for next time."""
        path = self._known_hosts_path(settings)

        def known() -> tuple[list, list, list]:
            try:
                text = path.read_text()
            except FileNotFoundError:
                text = ""
            except OSError as exc:
                raise ProvisionError(
                    FailureKind.HOST_KEY_UNKNOWN, f"cannot read known_hosts {path}: {exc}"
                ) from None
            matched = asyncssh.import_known_hosts(text).match(host.host, "", host.port)
            return list(matched[0]), list(matched[1]), list(matched[2])

        keys = known()
        if keys[0] or keys[1]:
            return keys
        if settings.known_hosts:
            raise ProvisionError(
                FailureKind.HOST_KEY_UNKNOWN,
                f"{_target(host)} is not in known_hosts {path}; add its key first "
                f"(ssh-keyscan -p {host.port} {host.host} >> {path})",
            )
        async with self._record:
            keys = known()  # another try may have recorded it meanwhile
            if keys[0] or keys[1]:
                return keys
            key = await asyncio.wait_for(
                asyncssh.get_server_host_key(
                    host.host, host.port, tunnel=tunnel or (), config=None
                ),
                self.connect_timeout,
            )
            if key is None:
                raise ProvisionError(
                    FailureKind.UNREACHABLE, f"{_target(host)} presented no host key"
                )
            pattern = host.host if host.port == 22 else f"[{host.host}]:{host.port}"
            algorithm, blob = key.export_public_key().decode().split()[:2]
            line = f"{pattern} {algorithm} {blob}"
            _append(path, line)
            log.warning(
                "first contact with %s: recorded its host key %s in %s",
                _target(host),
                key.get_fingerprint(),
                path,
            )
            return [key], [], []

    async def _check(
        self,
        conn: asyncssh.SSHClientConnection,
        host: SshHost,
        settings: SshSettings,
        *,
        strict: bool = True,
    ) -> dict[str, str]:
        """The OS, Python, a download tool and free disk; where the agent goes."""
        out = await self._run(
            conn,
            host,
            "sh -s -- " + shlex.join([host.python, host.prefix or "", host.data_dir or ""]),
            stdin=CHECK,
            what="checking the host",
        )
        facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if not strict:
            return facts
        where = _target(host)
        if facts.get("os") != "Linux":
            raise ProvisionError(
                FailureKind.UNSUPPORTED,
                f"{where} runs {facts.get('os') or 'an unknown OS'}, not Linux",
            )
        version = facts.get("python", "none")
        try:
            found = tuple(int(x) for x in version.split("."))
        except ValueError:
            found = ()
        if not found:
            raise ProvisionError(
                FailureKind.NO_PYTHON,
                f"no Python at {host.python!r} on {where} (the agent needs Python "
                f">= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}; set `python:` for this host)",
            )
        if found < MIN_PYTHON:
            raise ProvisionError(
                FailureKind.NO_PYTHON,
                f"{host.python} on {where} is Python {version}; the agent needs >= "
                f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} (set `python:` for this host)",
            )
        if facts.get("fetch") != "yes":
            raise ProvisionError(
                FailureKind.UNSUPPORTED,
                f"{where} has neither curl nor wget (the bootstrap needs one)",
            )
        try:
            free_mb = int(facts.get("free_kb", "")) // 1024
        except ValueError:
            free_mb = -1
        if 0 <= free_mb < settings.min_free_mb:
            raise ProvisionError(
                FailureKind.DISK_FULL,
                f"disk full on {where}: {free_mb} MB free at {facts.get('data')}, "
                f"the fleet needs {settings.min_free_mb} MB (min_free_mb)",
            )
        return facts

    async def _run(
        self,
        conn: asyncssh.SSHClientConnection,
        host: SshHost,
        command: str,
        *,
        stdin: str,
        what: str,
        kind: FailureKind = FailureKind.ERROR,
    ) -> str:
        """Run `command` on the host with `stdin`; its stdout, or a ProvisionError that
        says what failed (the last lines of its stderr; a full disk is DISK_FULL)."""
        try:
            r = await conn.run(command, input=stdin, check=False, timeout=self.command_timeout)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise ProvisionError(
                FailureKind.UNREACHABLE, f"{what} on {_target(host)}: {exc}"
            ) from None
        out, err = str(r.stdout or ""), str(r.stderr or "")
        if r.exit_status != 0:
            detail = _tail(err) or _tail(out) or f"exit status {r.exit_status}"
            if "No space left on device" in err + out:
                kind = FailureKind.DISK_FULL
            raise ProvisionError(kind, f"{what} on {_target(host)} failed: {detail}")
        return out


def _client_keys(host: SshHost) -> list[str] | tuple[()]:
    """The fleet's identity file for this host, or () for the defaults (the server's
    SSH agent and ~/.ssh keys)."""
    return [str(Path(host.identity_file).expanduser())] if host.identity_file else ()


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")


async def _quiet(_step: str) -> None:
    return None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _target(host: SshHost) -> str:
    return f"{host.user}@{_bracket(host.host)}:{host.port}"


def _failure(host: SshHost, exc: Exception, known: Path) -> ProvisionError:
    where = _target(host)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return ProvisionError(
            FailureKind.HOST_KEY_CHANGED,
            f"the host key of {where} is not the one in {known}: it changed since it was "
            "recorded, or something is in the way. Nothing was sent to it. If the change "
            f"is expected, remove its line from {known} and apply the fleet again",
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        key = f"the key {host.identity_file}" if host.identity_file else "our keys"
        return ProvisionError(FailureKind.AUTH, f"{where} refused {key}: {exc.reason}")
    if isinstance(exc, (OSError, TimeoutError, asyncssh.DisconnectError)):
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        return ProvisionError(
            FailureKind.UNREACHABLE, f"cannot reach {where}: {why or exc.__class__.__name__}"
        )
    return ProvisionError(FailureKind.ERROR, f"{where}: {exc.__class__.__name__}: {exc}")
