"""A throwaway cluster of real processes on loopback, for tests and benchmarks.

    with Cluster(tmp_path) as c:
        server = c.server()                  # `corral server` on SQLite, a free port
        c.agent(server, name="a1")           # `corral agent`
        job = c.client(server).submit(["echo", "hi"])

Every process it starts runs in its own session; on exit it stops them, then kills
anything still running whose command line or working directory lies under the
cluster's directory (runners and the commands they ran), so nothing outlives a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import httpx
import psutil

from corral.client.sdk import Client

T = TypeVar("T")


class Timeout(AssertionError):
    pass


JOB_PATH = "/usr/local/bin:/usr/bin:/bin"


def job_python() -> str:
    """A Python interpreter a job can run. A root agent runs jobs as an unprivileged
    job user on a minimal PATH, and the test runner's own interpreter may live where
    that user cannot read (e.g. under /root): use the system's."""
    return shutil.which("python3", path=JOB_PATH) or sys.executable


def slack() -> float:
    """How much longer than its nominal deadline a test waits for a condition:
    `CORRAL_TEST_SLACK` (default 1; the test suite sets 2 when it runs on several
    workers sharing the cores). A deadline only bounds waiting for a condition; no
    test asserts speed (timing lives in benchmarks/)."""
    return float(os.environ.get("CORRAL_TEST_SLACK", "1"))


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds
    (times `slack()`)."""
    timeout *= slack()
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise Timeout(
                f"timed out after {timeout:g}s waiting for {what}"
                + (f" (last error: {last_exc!r})" if last_exc else "")
            )
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {})}
        env.pop("CORRAL_SERVER", None)
        env.pop("CORRAL_TOKEN", None)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return self

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.args[:3]} was never started")
        return self.popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def corral_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral", *args]


class ServerProc(Proc):
    def __init__(
        self,
        data_dir: Path,
        port: int,
        db_url: str | None,
        extra: list[str],
        env: dict[str, str] | None,
        host: str = "127.0.0.1",
        ca: Path | None = None,
    ):
        args = corral_cmd(
            "server",
            "--data-dir",
            str(data_dir),
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            "info",
            *extra,
        )
        if db_url:
            args += ["--db", db_url]
        super().__init__(args, data_dir / "server.log", env)
        self.data_dir = data_dir
        self.port = port
        self.ca = ca  # a server with --tls-cert: the CA that signed its certificate
        self.url = f"{'https' if ca else 'http'}://{host}:{port}"

    def wait_ready(self, timeout: float = 30.0) -> ServerProc:
        import ssl

        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        )

        def up() -> bool:
            if not self.alive():
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            return httpx.get(self.url + "/health", timeout=2, verify=verify).status_code == 200

        wait_for(up, timeout, f"server on {self.url}", interval=0.1)
        return self

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def join_token(self) -> str:
        return (self.data_dir / "join.token").read_text().strip()

    def restart(self, timeout: float = 30.0) -> ServerProc:
        self.stop()
        self.start()
        return self.wait_ready(timeout)


class AgentProc(Proc):
    def __init__(
        self,
        data_dir: Path,
        servers: list[str],
        join_token: str,
        name: str,
        extra: list[str],
        env: dict[str, str] | None,
        token_file: Path | None = None,
    ):
        # the join token in a 0600 file, as the local backend and the systemd unit
        # pass it: never on a command line every process can read
        token_file = token_file or data_dir.parent / f"{name}.join-token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(join_token)
        args = corral_cmd(
            "agent",
            "--data-dir",
            str(data_dir),
            "--name",
            name,
            "--join-token-file",
            str(token_file),
            "--log-level",
            "info",
            *extra,
        )
        for s in servers:
            args += ["--server", s]
        super().__init__(args, data_dir / "agent.log", env)
        self.data_dir = data_dir
        self.name = name


class Cluster:
    """Owns every process it starts; `close()` leaves nothing running."""

    # fast timings so failures are detected in seconds, not minutes
    FAST: ClassVar[list[str]] = [
        "--agent-grace",
        "4",
        "--start-timeout",
        "15",
        "--attempt-grace",
        "20",
        "--heartbeat-interval",
        "1",
    ]

    def __init__(self, base: Path):
        self.base = Path(base)
        self.procs: list[Proc] = []
        self.servers: list[ServerProc] = []
        self.agents: list[AgentProc] = []
        self._clients: list[Client] = []
        self._secret_key: str | None = None

    @property
    def secret_key(self) -> str:
        """The key this cluster's servers on a shared database seal secrets with."""
        if self._secret_key is None:
            from cryptography.fernet import Fernet

            self._secret_key = Fernet.generate_key().decode()
        return self._secret_key

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def server(
        self,
        *,
        db_url: str | None = None,
        name: str | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        fast: bool = True,
        wait: bool = True,
        host: str = "127.0.0.1",
        ca: Path | None = None,
    ) -> ServerProc:
        """`corral server` listening on `host` (e.g. a test bed's bridge address); with
        `ca`, a server given --tls-cert/--tls-key whose certificate that CA signed."""
        name = name or f"server{len(self.servers) + 1}"
        extra = (self.FAST if fast else []) + (extra or [])
        if db_url and "CORRAL_SECRET_KEY" not in (env or {}):
            # servers of one database share the key that seals its secrets
            env = {**(env or {}), "CORRAL_SECRET_KEY": self.secret_key}
        proc = ServerProc(self.base / name, free_port(host), db_url, extra, env, host, ca)
        proc.start()
        self.procs.append(proc)
        self.servers.append(proc)
        return proc.wait_ready() if wait else proc

    def agent(
        self,
        server: ServerProc | str | Sequence[ServerProc | str],
        *,
        name: str | None = None,
        cpus: float | None = 2,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        join_token: str | None = None,
        data_dir: Path | None = None,
    ) -> AgentProc:
        """An agent of these servers (ServerProcs or URLs, e.g. a load balancer's)."""
        servers = [server] if isinstance(server, (ServerProc, str)) else list(server)
        urls = [s if isinstance(s, str) else s.url for s in servers]
        if join_token is None:
            join_token = next(s.join_token for s in servers if isinstance(s, ServerProc))
        name = name or f"agent{len(self.agents) + 1}"
        extra = list(extra or [])
        if cpus is not None:
            extra += ["--cpus", str(cpus)]
        proc = AgentProc(
            data_dir or self.base / "agents" / name,
            urls,
            join_token,
            name,
            extra,
            env,
            token_file=self.base / "agents" / f"{name}.join-token",
        )
        if data_dir is not None:  # e.g. a small disk: keep the log off it
            proc.log_path = self.base / "agents" / f"{name}.log"
        proc.start()
        self.procs.append(proc)
        self.agents.append(proc)
        return proc

    def up(
        self,
        *,
        agents: int,
        agent_cpus: float = 1,
        public_url: str | None = None,
        port: int | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> ServerProc:
        """`corral up`: a server on SQLite that runs a local fleet of `agents` agents
        (real processes, supervised by the server's local backend)."""
        data_dir = self.base / "up"
        port = port or free_port()
        args = [
            "--agents",
            str(agents),
            "--agent-cpus",
            str(agent_cpus),
            *self.FAST,
            *(extra or []),
        ]
        if public_url:
            args += ["--public-url", public_url]
        proc = ServerProc(data_dir, port, None, [], env)
        proc.args = corral_cmd(
            "up", "--data-dir", str(data_dir), "--port", str(port), "--log-level", "info", *args
        )
        proc.start()
        self.procs.append(proc)
        self.servers.append(proc)
        return proc.wait_ready()

    def client(self, server: ServerProc) -> Client:
        c = Client(server=server.url, token=server.admin_token, ca=server.ca)
        self._clients.append(c)
        return c

    def wait_agents_running(self, client: Client, n: int, timeout: float = 30) -> list:
        def ready():
            running = [i for i in client.instances() if i.state == "running" and not i.lost]
            return running if len(running) >= n else None

        return wait_for(ready, timeout, f"{n} running instance(s)")

    def agent_dirs(self) -> list[Path]:
        """Data dirs of every agent of this cluster: its own, and `corral up`'s."""
        dirs = [a.data_dir for a in self.agents]
        for s in self.servers:
            if (s.data_dir / "agents").is_dir():
                dirs += [d for d in (s.data_dir / "agents").iterdir() if d.is_dir()]
        return dirs

    def zygotes(self) -> list[psutil.Process]:
        """The live zygotes of this cluster's agents (one per agent data dir at most),
        and the spare runner each keeps forked (waiting for an attempt)."""
        from corral.agent.proctree import same_process
        from corral.agent.zygote import PID_NAME, spares

        out = []
        for d in self.agent_dirs():
            try:
                info = json.loads((d / PID_NAME).read_text())
            except (OSError, ValueError):
                continue
            p = same_process(info["pid"], info.get("create_time"))
            if p is not None:
                out.append(p)
                out.extend(spares(p))
        return out

    def leftovers(self, zygotes: bool = False) -> list[psutil.Process]:
        """Processes under this cluster's directory that are still alive (runners,
        and the commands they ran, found by command line or working directory,
        theirs or their agents' job directories). An agent's zygote is part of the
        agent, not a leftover of an attempt: counted only with `zygotes`."""
        from corral.agent.sandbox.host import default_jobs_dir

        roots = [str(self.base.resolve())]
        roots += [str(default_jobs_dir(d, os.geteuid() == 0)) for d in self.agent_dirs()]
        mine = {p.pid for p in self.procs if p.alive()}
        if not zygotes:
            mine |= {p.pid for p in self.zygotes()}
        out = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
            try:
                if p.pid == os.getpid() or p.pid in mine:
                    continue
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(p.info["cmdline"] or [])
                cwd = p.info["cwd"] or ""
                if any(r in cmd or cwd.startswith(r) for r in roots):
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def close(self) -> None:
        for c in self._clients:
            c.close()
        # agents first, then servers, then anything else it was given (e.g. an S3Server)
        owned: list[Proc] = [*reversed(self.agents), *self.servers, *self.procs]
        for proc in owned:
            proc.stop(timeout=20)
        for p in self.leftovers(zygotes=True):
            try:
                p.kill()
            except psutil.Error:
                pass
        self._remove_sandboxes()

    def _remove_sandboxes(self) -> None:
        for d in self.agent_dirs():
            remove_agent_sandbox(d, keep_under=self.base)


def remove_agent_sandbox(data_dir: Path, keep_under: Path | None = None) -> None:
    """What an agent that was killed leaves outside its data dir: its attempts'
    cgroups (what is in them killed) and its jobs directory (unless it lies under
    `keep_under`, removed with it)."""
    from corral.agent.sandbox.cgroups import agent_key, cleanup_agent_groups
    from corral.agent.sandbox.host import default_jobs_dir

    cleanup_agent_groups(agent_key(data_dir))
    jobs = default_jobs_dir(data_dir, os.geteuid() == 0)
    if jobs.is_dir() and not (keep_under is not None and jobs.is_relative_to(keep_under)):
        shutil.rmtree(jobs, ignore_errors=True)


class ArtifactServer:
    """Serves blobs over real HTTP on loopback, honours If-None-Match, counts every
    request and every body byte, and can misbehave on purpose (403, 500, truncated
    bodies) to prove such answers are never installed.

        with ArtifactServer() as a:
            url = a.put("/runner-1.0", b"...")
            ...
            assert a.body_bytes("/runner-1.0") == len(data)
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.blobs: dict[str, bytes] = {}
        self.etags: dict[str, str | None] = {}
        self.modes: dict[str, str] = {}
        self.log: list[tuple[str, int, int]] = []  # (path, status, body bytes)
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(
                self,
                status: int,
                body: bytes,
                headers: dict | None = None,
                declared: int | None = None,
            ) -> None:
                with outer._lock:  # counted before the client can see the answer
                    outer.log.append((self.path, status, len(body)))
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                if declared is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self) -> None:
                path = self.path
                mode = outer.modes.get(path, "ok")
                if path not in outer.blobs:
                    return self._send(404, b"not found")
                if mode == "403":
                    return self._send(403, b"<html><body>403 Forbidden</body></html>\n")
                if mode == "500":
                    return self._send(500, b"<html><body>Internal Server Error</body></html>\n")
                data, etag = outer.blobs[path], outer.etags.get(path)
                headers = {"ETag": etag} if etag else {}
                if etag and self.headers.get("If-None-Match") == etag:
                    return self._send(304, b"", headers)
                if mode == "truncate":
                    self._send(200, data[: len(data) // 2], headers, declared=len(data))
                    self.close_connection = True
                    return None
                return self._send(200, data, headers)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll keeps shutdown() from waiting the default half second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def put(self, path: str, data: bytes, *, etag: str | None = "auto", mode: str = "ok") -> str:
        import hashlib

        self.blobs[path] = data
        self.etags[path] = f'"{hashlib.sha256(data).hexdigest()[:16]}"' if etag == "auto" else etag
        self.modes[path] = mode
        return self.base + path

    def requests(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for p, _s, _b in self.log if path is None or p == path)

    def body_bytes(self, path: str | None = None) -> int:
        with self._lock:
            return sum(b for p, _s, b in self.log if path is None or p == path)

    def statuses(self, path: str | None = None) -> list[int]:
        with self._lock:
            return [s for p, s, _b in self.log if path is None or p == path]


class Proxy:
    """An HTTP proxy on loopback between agents and servers.

    Each request goes to the next backend in turn (a round-robin load balancer, so one
    agent's heartbeats are answered by every server alternately). `hold(instance_id)`
    delays that instance's heartbeats, as a slow network would, until `release`."""

    HEARTBEAT = "/api/v1/agents/heartbeat"

    def __init__(self, backends: list[str]):
        import json
        import threading

        import uvicorn

        self.backends = backends
        self.counts = [0] * len(backends)
        self.seen: list[tuple[str, str, int]] = []  # (method, path, request body bytes)
        self.held: dict[str, asyncio.Event] = {}
        self.delayed: list[str] = []
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        outer = self

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    msg = await receive()
                    if msg["type"] == "lifespan.startup":
                        outer._loop = asyncio.get_running_loop()
                        await send({"type": "lifespan.startup.complete"})
                    elif msg["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            outer.seen.append((scope["method"], scope["path"], len(body)))
            if scope["path"] == outer.HEARTBEAT:
                try:
                    iid = json.loads(body).get("instance_id")
                except ValueError:
                    iid = None
                gate = outer.held.get(iid)
                if gate is not None:
                    outer.delayed.append(iid)
                    await gate.wait()
            k = outer._next % len(outer.backends)
            outer._next += 1
            outer.counts[k] += 1
            url = outer.backends[k] + scope["path"]
            if scope.get("query_string"):
                url += "?" + scope["query_string"].decode()
            headers = [
                (n.decode(), v.decode())
                for n, v in scope["headers"]
                # the body is forwarded whole, with a length of its own: a client's
                # chunked framing must not go with it (a request carrying both is
                # refused as a smuggling attempt by a strict parser)
                if n.lower() not in (b"host", b"content-length", b"transfer-encoding")
            ]
            try:
                async with httpx.AsyncClient(timeout=120) as client:
                    r = await client.request(scope["method"], url, content=body, headers=headers)
                status, content = r.status_code, r.content
                out_headers = [
                    (n.encode(), v.encode())
                    for n, v in r.headers.items()
                    if n.lower()
                    not in ("content-length", "transfer-encoding", "content-encoding", "connection")
                ]
            except httpx.HTTPError:
                status, content, out_headers = 502, b'{"error": "backend down"}', []
            out_headers.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": out_headers})
            await send({"type": "http.response.body", "body": content})

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve()), daemon=True
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the proxy is not running")
        return self._loop

    def hold(self, instance_id: str) -> None:
        """Delay this instance's heartbeats (each waits at the proxy) until release."""

        def make() -> None:
            self.held[instance_id] = asyncio.Event()

        self.loop.call_soon_threadsafe(make)
        wait_for(lambda: instance_id in self.held, 5, "the hold to take effect")

    def release(self, instance_id: str) -> None:
        def free() -> None:
            gate = self.held.pop(instance_id, None)
            if gate is not None:
                gate.set()

        self.loop.call_soon_threadsafe(free)

    def __enter__(self) -> Proxy:
        self._thread.start()
        wait_for(lambda: self._server.started, 10, "the proxy to listen")
        return self

    def __exit__(self, *exc) -> None:
        for iid in list(self.held):
            self.release(iid)
        self._server.should_exit = True
        self._thread.join(timeout=10)


class S3Server(Proc):
    """An S3-compatible server (moto's server mode) on a loopback port, for tests and
    benchmarks of durable offload."""

    @staticmethod
    def executable() -> str | None:
        """moto_server beside this Python (installed by the project's test extra)."""
        return shutil.which("moto_server", path=str(Path(sys.executable).parent))

    def __init__(self, base: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [self.executable() or "moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            base / "s3.log",
        )

    def wait_ready(self) -> S3Server:
        def up() -> bool:
            if not self.alive():
                raise AssertionError(f"moto_server exited:\n{self.log()}")
            try:
                return httpx.get(self.url + "/", timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "the S3-compatible server", interval=0.2)
        return self

    def create_bucket(self, name: str) -> None:
        assert httpx.put(f"{self.url}/{name}", timeout=10).status_code == 200
