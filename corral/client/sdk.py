"""The Python SDK: everything the CLI does, as method calls (the CLI is built on it).

    from corral import Client
    with Client() as c:               # a context, CORRAL_SERVER / CORRAL_TOKEN, or ~/.corral
        job = c.run(["python3", "-c", "print(42)"], name="answer")   # waits by default
        print(job.state, job.exit_code)
        for text in job.logs():           # follow=True streams until the job ends
            print(text, end="")
        job.download("model.pt", "out/model.pt")

`AsyncClient` is the same for asyncio (`await c.run(...)`, `await job.wait()`).
Results are the wire schema's typed models (JobView, OutputView, ...).
"""

from __future__ import annotations

import base64
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from corral.client.config import ConfigError, resolve
from corral.domain.jobs import FINAL_JOB_STATES

# the wire models (and pydantic) load when a method first needs them: `corral run` sends
# a job and prints its id without them (see Client.submit_for_id)
if TYPE_CHECKING:
    from corral.api import (
        ComponentView,
        DrainView,
        EventView,
        FleetView,
        InstanceComponentView,
        InstanceView,
        ObjectView,
        OutputView,
        RolloutView,
        ServerView,
        TokenRotated,
        TokenView,
    )
    from corral.api.jobs import JobSubmit, JobView, LogPage


def _file_chunks(path, on_progress: Callable[[int], None] | None):
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            if on_progress:
                on_progress(len(chunk))
            yield chunk


def last_lines(chunks: list[tuple[str, bytes]], n: int) -> list[tuple[str, bytes]]:
    """The pieces of `chunks` (stream, bytes) that make up their last `n` lines (both
    streams together, in order; an unfinished last line counts as a line)."""
    pieces: list[tuple[int, str, bytes]] = []
    line = 0
    for stream, data in chunks:
        for piece in data.splitlines(keepends=True):
            pieces.append((line, stream, piece))
            if piece.endswith((b"\n", b"\r")):
                line += 1
    if not pieces or n <= 0:
        return []
    last = pieces[-1][0]
    return [(stream, piece) for no, stream, piece in pieces if no > last - n]


def _verify(urls: list[str], ca: str | None) -> ssl.SSLContext | bool:
    """Certificate verification for https:// servers (the system's CAs and `ca`). A
    plain http:// server has no TLS to verify (and redirects are not followed), so the
    client skips building an SSL context it would never use: loading the CA bundle is a
    third of a CLI command's start-up."""
    if all(u.startswith("http://") for u in urls):
        return False
    return tls_context(ca)


def _log_steps(job_id, attempt, until_final, wait, tail):
    """The log-following loop without its I/O, shared by Client and AsyncClient. It
    yields ("get", params) and is sent the LogPage; it yields ("out", (stream, bytes))
    and ("notice", text) for the caller to act on; it returns the last page."""
    following, after = attempt or 0, -1
    said = None
    if tail is not None:
        held: list[tuple[str, bytes]] = []
        while True:
            page = yield ("get", {"attempt": following or None, "after": after})
            if not following and page.attempt:
                following = page.attempt
            if not page.chunks:
                break
            held += [(c.stream, base64.b64decode(c.data)) for c in page.chunks]
            after = page.next_seq
        for piece in last_lines(held, tail):
            yield ("out", piece)
        if not until_final:
            return page
    while True:
        page = yield (
            "get",
            {"attempt": following or None, "after": after, "wait": wait if until_final else 0},
        )
        if not following and page.attempt:
            following = page.attempt
        for chunk in page.chunks:
            yield ("out", (chunk.stream, base64.b64decode(chunk.data)))
        after = page.next_seq
        if page.chunks:
            continue
        if until_final and page.job_state == "queued" and page.reason and page.reason != said:
            said = page.reason  # why it waits, once per new reason
            yield ("notice", page.reason)
        moved_on = page.current_attempt and page.current_attempt != following
        if attempt is None and moved_on:
            if following:
                yield (
                    "notice",
                    f"attempt {following} ended; following attempt {page.current_attempt}",
                )
            following, after = page.current_attempt, -1
            continue
        if not until_final or page.job_state in FINAL_JOB_STATES or moved_on:
            return page


def _answer(c, resp: httpx.Response):
    """The JSON of a reply, or CorralError with the server's message."""
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            message, code = err["message"], err["code"]
        except (ValueError, KeyError, TypeError):
            message, code = resp.text[:500] or resp.reason_phrase, None
        if resp.status_code == 401:
            message += (
                f" (the token came from {c.token_source}; give the server's admin token "
                "with --token, CORRAL_TOKEN or a context: corral context add)"
            )
        raise CorralError(message, status=resp.status_code, code=code)
    return resp.json()


def _failover(c, send):
    """send(url) to c.server, then each other server in turn while none can be
    reached; the first that answers becomes c.server."""
    order = [c.server] + [u for u in c.server_urls if u != c.server]
    last: Exception | None = None
    for url in order:
        try:
            resp = send(url)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last = exc
            continue
        except httpx.TransportError as exc:
            last = exc
            break  # the request may have reached the server: not safe to resend
        c.server = url
        return resp
    raise _unreachable(", ".join(order), last or ConnectionError("no server to try"))


class CorralError(Exception):
    """An error answer from the server, or no answer at all."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def tls_context(ca: str | None) -> ssl.SSLContext:
    """The system's CAs, and `ca` (PEM) if given."""
    ctx = ssl.create_default_context()
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise CorralError(f"--ca/CORRAL_CA {ca}: cannot load it as a CA ({exc})") from None
    return ctx


def _unreachable(server: str, exc: Exception) -> CorralError:
    if "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(
        exc.__context__ or exc.__cause__, ssl.SSLCertVerificationError
    ):
        return CorralError(
            f"the server at {server} presented a TLS certificate this client does not trust "
            f"({exc}). If a private CA signed it, pass --ca FILE or set CORRAL_CA to that CA."
        )
    return CorralError(
        f"cannot reach the corral server at {server} ({exc.__class__.__name__}). "
        "Is it running? Start one with `corral up`, or set CORRAL_SERVER."
    )


def _configure(c, server, token, ca) -> tuple[dict[str, str], ssl.SSLContext | bool]:
    """Resolve server(s), token and CA as the CLI does, set them on client `c`, and
    return its HTTP headers and TLS verification (shared by Client and AsyncClient)."""
    try:
        cfg = resolve(server, token, str(ca) if ca else None)
    except ConfigError as exc:
        raise CorralError(str(exc)) from None
    c.server_urls = cfg.servers
    c.server = cfg.servers[0]
    c.token_source = cfg.token_source
    headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
    return headers, _verify(cfg.servers, cfg.ca)


class Client:
    server_urls: list[str]  # set by _configure
    server: str  # the one that answered last
    token_source: str

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        ca: str | os.PathLike | None = None,
    ):
        headers, verify = _configure(self, server, token, ca)
        self._http = httpx.Client(headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, to the current server; if it cannot be reached (the request
        never left), to the next one (a comma-separated --server / CORRAL_SERVER)."""
        return _failover(self, lambda url: self._http.request(method, url + path, **kwargs))

    def _call(
        self,
        method: str,
        path: str,
        *,
        json=None,
        params=None,
        timeout=None,
        content=None,
        headers=None,
    ):
        kwargs = {"json": json, "params": params, "headers": headers}
        if content is not None:
            kwargs["content"] = content
        if timeout is not None:
            kwargs["timeout"] = timeout
        return _answer(self, self._send(method, path, **kwargs))

    # -- jobs ----------------------------------------------------------------------------------

    SUBMIT_TRIES = 4

    def submit(
        self, command: list[str], *, idempotency_key: str | None = None, **options
    ) -> JobView:
        """Submit a job. The call sends one Idempotency-Key (`idempotency_key`, or a
        new random one) and retries with it when the server cannot be reached or
        answers 5xx: a retry of a submit the server did commit returns that job, never
        a second one. A spec JobSubmit refuses raises its ValidationError (a
        ValueError) before any request."""
        from corral.api.jobs import JobSubmit, JobView

        spec = JobSubmit(command=command, **options)
        body = spec.model_dump(exclude_defaults=True)
        return JobView.model_validate(self._post_job(body, idempotency_key))

    def submit_for_id(
        self, command: list[str], *, idempotency_key: str | None = None, **options
    ) -> int:
        """Submit a job as `submit` does and return only its id, without loading the
        wire models (pydantic and their schemas are half of `corral run`'s start-up).
        The server checks the spec (the same JobSubmit); the client checks it too only
        when the server refuses it or cannot be reached, so that a bad spec raises
        the same ValidationError as `submit`, and is never retried."""

        def check() -> None:
            from corral.api.jobs import JobSubmit

            JobSubmit(command=command, **options)

        reply = self._post_job({"command": command, **options}, idempotency_key, check)
        return int(reply["id"])

    def _post_job(
        self, body: dict, idempotency_key: str | None, check: Callable[[], None] | None = None
    ) -> dict:
        """POST a job under one Idempotency-Key, retried while no server answers or it
        answers 5xx. `check`, if given, runs once when the first try fails in any way,
        the body not even encoding as JSON included (it may raise instead)."""
        key = idempotency_key or uuid.uuid4().hex
        for attempt in range(self.SUBMIT_TRIES):
            try:
                return self._call(
                    "POST", "/api/v1/jobs", json=body, headers={"Idempotency-Key": key}
                )
            except Exception as exc:
                if check is not None:
                    check()
                    check = None
                if not isinstance(exc, CorralError):
                    raise
                retryable = exc.status is None or exc.status >= 500
                if not retryable or attempt + 1 == self.SUBMIT_TRIES:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def submit_batch(self, specs: list[JobSubmit]) -> list[int]:
        """Submit many jobs in one request (all or none); their ids, in order."""
        body = {"jobs": [s.model_dump(exclude_defaults=True) for s in specs]}
        return list(self._call("POST", "/api/v1/jobs:batch", json=body)["ids"])

    def submit_array(self, command: list[str], first: int, last: int, **options) -> list[int]:
        """Tasks `first`..`last` of one command, each with $CORRAL_ARRAY_INDEX set."""
        from corral.api.jobs import MAX_BATCH, JobSubmit

        env = dict(options.pop("env", None) or {})
        specs = [
            JobSubmit(command=command, env={**env, "CORRAL_ARRAY_INDEX": str(i)}, **options)
            for i in range(first, last + 1)
        ]
        ids: list[int] = []
        for k in range(0, len(specs), MAX_BATCH):
            ids += self.submit_batch(specs[k : k + MAX_BATCH])
        return ids

    def jobs(
        self, states: list[str] | None = None, limit: int = 100, before: int | None = None
    ) -> list[JobView]:
        from corral.api.jobs import JobView

        params = {"limit": limit, "state": states or []}
        if before is not None:
            params["before"] = before
        return [JobView.model_validate(j) for j in self._call("GET", "/api/v1/jobs", params=params)]

    def job(self, job_id: int) -> JobView:
        from corral.api.jobs import JobView

        return JobView.model_validate(self._call("GET", f"/api/v1/jobs/{job_id}"))

    def cancel(self, job_id: int) -> JobView:
        from corral.api.jobs import JobView

        return JobView.model_validate(self._call("POST", f"/api/v1/jobs/{job_id}/cancel"))

    def requeue(self, job_id: int) -> JobView:
        from corral.api.jobs import JobView

        return JobView.model_validate(self._call("POST", f"/api/v1/jobs/{job_id}/requeue"))

    def logs(
        self, job_id: int, *, attempt: int | None = None, after: int = -1, wait: float = 0
    ) -> LogPage:
        from corral.api.jobs import LogPage

        params = {"after": after, "wait": wait}
        if attempt:
            params["attempt"] = attempt
        return LogPage.model_validate(
            self._call("GET", f"/api/v1/jobs/{job_id}/logs", params=params, timeout=wait + 30)
        )

    def follow(
        self,
        job_id: int,
        *,
        on_output: Callable[[str, bytes], None],
        on_notice: Callable[[str], None] | None = None,
        attempt: int | None = None,
        until_final: bool = True,
        wait: float = 10.0,
        tail: int | None = None,
    ) -> LogPage:
        """Stream a job's output as it is produced, following it from attempt to
        attempt (or only `attempt`), until the job ends; with until_final=False, only
        what is there now; with `tail`, starting with only the last `tail` lines of what
        is there now. Returns the last page (it carries the job's state)."""
        steps = _log_steps(job_id, attempt, until_final, wait, tail)
        reply = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as stop:
                return stop.value
            if step[0] == "get":
                reply = self.logs(job_id, **step[1])
            else:
                reply = None
                if step[0] == "out":
                    on_output(*step[1])
                elif on_notice:
                    on_notice(step[1])

    def get(self, job_id: int) -> Job:
        """A handle on an existing job (see `Job`)."""
        return Job(self, self.job(job_id))

    def run(
        self,
        command: list[str] | str,
        *,
        wait: bool = True,
        timeout: float | None = None,
        **options,
    ) -> Job:
        """Submit a job (options as `JobSubmit`: name, fleet, cpus, memory_mb, env, ...)
        and, with wait=True, return once it has ended (TimeoutError after `timeout`).
        A string command is split like a shell would (shlex)."""
        if isinstance(command, str):
            import shlex

            command = shlex.split(command)
        job = Job(self, self.submit(command, **options))
        if wait:
            job.wait(timeout)
        return job

    # -- fleet and control plane ------------------------------------------------------------

    def instances(self, include_terminated: bool = False) -> list[InstanceView]:
        from corral.api import InstanceView

        return [
            InstanceView.model_validate(i)
            for i in self._call("GET", "/api/v1/instances", params={"all": include_terminated})
        ]

    def events(
        self,
        level: str = "info",
        after: int = 0,
        limit: int = 100,
        wait: float = 0,
        job: int | None = None,
    ) -> list[EventView]:
        from corral.api import EventView

        params = {"level": level, "after": after, "limit": limit, "wait": wait}
        if job is not None:
            params["job"] = job
        return [
            EventView.model_validate(e)
            for e in self._call("GET", "/api/v1/events", params=params, timeout=wait + 30)
        ]

    def servers(self, include_stopped: bool = False) -> list[ServerView]:
        from corral.api import ServerView

        return [
            ServerView.model_validate(s)
            for s in self._call("GET", "/api/v1/servers", params={"all": include_stopped})
        ]

    def health(self) -> dict:
        return self._call("GET", "/health")

    # -- outputs, uploads, instances and fleets ----------------------------------------------

    def outputs(self, job_id: int) -> list[OutputView]:
        from corral.api import OutputView

        return [
            OutputView.model_validate(o)
            for o in self._call("GET", f"/api/v1/jobs/{job_id}/outputs")
        ]

    def object(self, sha256: str) -> ObjectView:
        from corral.api import ObjectView

        return ObjectView.model_validate(self._call("GET", f"/api/v1/objects/{sha256}"))

    def download(self, sha256: str, dest, on_progress: Callable[[int], None] | None = None):
        """Stream an object to `dest`, verifying its sha256; `dest` appears only
        complete and verified."""
        import hashlib
        import os
        from pathlib import Path

        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        try:
            with self._http.stream(
                "GET",
                f"{self.server}/api/v1/objects/{sha256}/content",
                timeout=httpx.Timeout(30, read=600),
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    try:
                        message = resp.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = resp.text[:300]
                    raise CorralError(message, status=resp.status_code)
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes(1024 * 1024):
                        digest.update(chunk)
                        f.write(chunk)
                        if on_progress:
                            on_progress(len(chunk))
            if digest.hexdigest() != sha256:
                raise CorralError(
                    f"downloaded bytes have sha256 {digest.hexdigest()}, not "
                    f"{sha256}; nothing written to {dest}"
                )
            os.replace(tmp, dest)
        except httpx.TransportError as exc:
            raise CorralError(f"download of {sha256[:12]}… failed: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def put(
        self,
        path,
        name: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        wait: float = 60,
    ) -> ObjectView:
        """Upload a file as an object that lives on the instances (a job input); the
        answer comes once an instance holds it, or after `wait` seconds."""
        from pathlib import Path

        from corral.api import ObjectView

        return ObjectView.model_validate(
            self._call(
                "PUT",
                "/api/v1/objects",
                params={"name": name or Path(path).name, "wait": wait},
                content=_file_chunks(path, on_progress),
                timeout=900,
            )
        )

    def drain(self, instance: str, force: bool = False) -> DrainView:
        from corral.api import DrainView

        return DrainView.model_validate(
            self._call("POST", f"/api/v1/instances/{instance}/drain", json={"force": force})
        )

    def tokens(self) -> list[TokenView]:
        from corral.api import TokenView

        return [TokenView.model_validate(t) for t in self._call("GET", "/api/v1/tokens")]

    def rotate_token(self, kind: str) -> TokenRotated:
        from corral.api import TokenRotated

        return TokenRotated.model_validate(self._call("POST", f"/api/v1/tokens/rotate/{kind}"))

    def revoke_token(self, token_id: str) -> TokenView:
        from corral.api import TokenView

        return TokenView.model_validate(self._call("POST", f"/api/v1/tokens/{token_id}/revoke"))

    def undrain(self, instance: str) -> InstanceView:
        from corral.api import InstanceView

        return InstanceView.model_validate(
            self._call("POST", f"/api/v1/instances/{instance}/undrain")
        )

    def instance(self, instance: str) -> InstanceView:
        from corral.api import InstanceView

        return InstanceView.model_validate(self._call("GET", f"/api/v1/instances/{instance}"))

    def fleets(self) -> list[FleetView]:
        from corral.api import FleetView

        return [FleetView.model_validate(f) for f in self._call("GET", "/api/v1/fleets")]

    def apply_fleet(self, spec: dict) -> FleetView:
        from corral.api import FleetSpec, FleetView

        fleet = FleetSpec.model_validate(spec)
        return FleetView.model_validate(
            self._call("PUT", f"/api/v1/fleets/{fleet.name}", json=fleet.model_dump())
        )

    def scale(self, fleet: str, size: int) -> FleetView:
        from corral.api import FleetView

        return FleetView.model_validate(
            self._call("POST", f"/api/v1/fleets/{fleet}/scale", json={"size": size})
        )

    # -- components and rollouts -------------------------------------------------------------

    def components(self) -> list[ComponentView]:
        from corral.api import ComponentView

        return [ComponentView.model_validate(c) for c in self._call("GET", "/api/v1/components")]

    def publish(
        self, name: str, version: str, url: str, sha256: str, size: int | None = None
    ) -> ComponentView:
        from corral.api import ComponentPublish, ComponentView

        spec = ComponentPublish(name=name, version=version, url=url, sha256=sha256, size=size)
        return ComponentView.model_validate(
            self._call("POST", "/api/v1/components", json=spec.model_dump())
        )

    def upload(self, path, on_progress: Callable[[int], None] | None = None) -> dict:
        """Store a file on the server as a component artifact; returns {sha256, size, url}."""
        return self._call(
            "PUT", "/api/v1/artifacts", content=_file_chunks(path, on_progress), timeout=600
        )

    def component_status(self, component: str | None = None) -> list[InstanceComponentView]:
        from corral.api import InstanceComponentView

        params = {"component": component} if component else None
        return [
            InstanceComponentView.model_validate(r)
            for r in self._call("GET", "/api/v1/components/status", params=params)
        ]

    def rollout(self, component: str, version: str, **options) -> RolloutView:
        from corral.api import RolloutRequest, RolloutView

        req = RolloutRequest(component=component, version=version, **options)
        return RolloutView.model_validate(
            self._call("POST", "/api/v1/rollouts", json=req.model_dump())
        )

    def rollouts(self, limit: int = 50) -> list[RolloutView]:
        from corral.api import RolloutView

        return [
            RolloutView.model_validate(r)
            for r in self._call("GET", "/api/v1/rollouts", params={"limit": limit})
        ]

    def resume_rollout(self, rollout_id: int) -> RolloutView:
        from corral.api import RolloutView

        return RolloutView.model_validate(
            self._call("POST", f"/api/v1/rollouts/{rollout_id}/resume")
        )

    def rollback(self, component: str, fleet: str | None = None) -> RolloutView:
        from corral.api import RolloutView

        params = {"component": component, **({"fleet": fleet} if fleet else {})}
        return RolloutView.model_validate(
            self._call("POST", "/api/v1/rollouts/rollback", params=params)
        )


class Job:
    """A submitted job: its latest view (`.view`, and its fields as attributes:
    `.id`, `.state`, `.exit_code`, `.reason`, ...) and what can be done with it."""

    def __init__(self, client: Client, view: JobView):
        self.client = client
        self.view = view

    def __getattr__(self, name: str):
        return getattr(self.view, name)

    def __repr__(self) -> str:
        return f"<Job {self.view.id} {self.view.state}>"

    @property
    def done(self) -> bool:
        return self.view.state in FINAL_JOB_STATES

    def refresh(self) -> JobView:
        self.view = self.client.job(self.view.id)
        return self.view

    def wait(self, timeout: float | None = None) -> JobView:
        """Block until the job has ended (succeeded, failed or cancelled); TimeoutError
        after `timeout` seconds. Uses the server's long-poll, not a busy loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"job {self.view.id} is still {self.view.state} after {timeout:g}s"
                )
            # the logs long-poll returns at once when the job ends (or on new output)
            self.client.logs(self.view.id, after=2**62, wait=min(10.0, left or 10.0))
            self.refresh()
        return self.view

    def logs(self, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        """The job's output as text pieces (stdout and stderr as they were written);
        with follow=True, streaming until the job ends."""
        out: list[str] = []

        def keep(stream: str, data: bytes) -> None:
            out.append(data.decode("utf-8", "replace"))

        if not follow:
            self.client.follow(self.view.id, on_output=keep, until_final=False, tail=tail)
            yield from out
            return
        steps = _log_steps(self.view.id, None, True, 10.0, tail)
        reply = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            reply = None
            if step[0] == "get":
                reply = self.client.logs(self.view.id, **step[1])
            elif step[0] == "out":
                yield step[1][1].decode("utf-8", "replace")

    def outputs(self) -> list[OutputView]:
        return self.client.outputs(self.view.id)

    def download(self, path: str, dest) -> Path:
        """Download the output `path` to `dest`, verified by sha256."""
        for o in self.outputs():
            if o.path == path:
                return self.client.download(o.sha256, dest)
        raise CorralError(f"job {self.view.id} has no output {path!r}", status=404)

    def cancel(self) -> JobView:
        self.view = self.client.cancel(self.view.id)
        return self.view


class AsyncClient:
    """The SDK for asyncio: the job calls of `Client` (run, submit, job, jobs, cancel,
    logs, outputs, instances, health), awaitable."""

    server_urls: list[str]  # set by _configure
    server: str  # the one that answered last
    token_source: str

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        ca: str | os.PathLike | None = None,
    ):
        headers, verify = _configure(self, server, token, ca)
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout, verify=verify)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, *, json=None, params=None, timeout=None):
        kwargs: dict = {"json": json, "params": params}
        if timeout is not None:
            kwargs["timeout"] = timeout
        order = [self.server] + [u for u in self.server_urls if u != self.server]
        last: Exception | None = None
        for url in order:
            try:
                resp = await self._http.request(method, url + path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
                continue
            except httpx.TransportError as exc:
                last = exc
                break
            self.server = url
            return _answer(self, resp)
        raise CorralError(
            f"cannot reach the corral server at {', '.join(order)} "
            f"({last.__class__.__name__}). Is it running?"
        )

    async def submit(self, command: list[str], **options) -> JobView:
        from corral.api.jobs import JobSubmit, JobView

        spec = JobSubmit(command=command, **options)
        return JobView.model_validate(
            await self._call("POST", "/api/v1/jobs", json=spec.model_dump(exclude_defaults=True))
        )

    async def job(self, job_id: int) -> JobView:
        from corral.api.jobs import JobView

        return JobView.model_validate(await self._call("GET", f"/api/v1/jobs/{job_id}"))

    async def jobs(self, states: list[str] | None = None, limit: int = 100) -> list[JobView]:
        from corral.api.jobs import JobView

        params = {"limit": limit, "state": states or []}
        rows = await self._call("GET", "/api/v1/jobs", params=params)
        return [JobView.model_validate(j) for j in rows]

    async def cancel(self, job_id: int) -> JobView:
        from corral.api.jobs import JobView

        return JobView.model_validate(await self._call("POST", f"/api/v1/jobs/{job_id}/cancel"))

    async def logs(
        self, job_id: int, *, attempt: int | None = None, after: int = -1, wait: float = 0
    ) -> LogPage:
        from corral.api.jobs import LogPage

        params: dict = {"after": after, "wait": wait}
        if attempt:
            params["attempt"] = attempt
        return LogPage.model_validate(
            await self._call("GET", f"/api/v1/jobs/{job_id}/logs", params=params, timeout=wait + 30)
        )

    async def outputs(self, job_id: int) -> list[OutputView]:
        from corral.api import OutputView

        rows = await self._call("GET", f"/api/v1/jobs/{job_id}/outputs")
        return [OutputView.model_validate(o) for o in rows]

    async def instances(self, include_terminated: bool = False) -> list[InstanceView]:
        from corral.api import InstanceView

        rows = await self._call("GET", "/api/v1/instances", params={"all": include_terminated})
        return [InstanceView.model_validate(i) for i in rows]

    async def health(self) -> dict:
        return await self._call("GET", "/health")

    async def get(self, job_id: int) -> AsyncJob:
        return AsyncJob(self, await self.job(job_id))

    async def run(
        self,
        command: list[str] | str,
        *,
        wait: bool = True,
        timeout: float | None = None,
        **options,
    ) -> AsyncJob:
        if isinstance(command, str):
            import shlex

            command = shlex.split(command)
        job = AsyncJob(self, await self.submit(command, **options))
        if wait:
            await job.wait(timeout)
        return job


class AsyncJob:
    """`Job` for AsyncClient."""

    def __init__(self, client: AsyncClient, view: JobView):
        self.client = client
        self.view = view

    def __getattr__(self, name: str):
        return getattr(self.view, name)

    @property
    def done(self) -> bool:
        return self.view.state in FINAL_JOB_STATES

    async def refresh(self) -> JobView:
        self.view = await self.client.job(self.view.id)
        return self.view

    async def wait(self, timeout: float | None = None) -> JobView:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"job {self.view.id} is still {self.view.state} after {timeout:g}s"
                )
            await self.client.logs(self.view.id, after=2**62, wait=min(10.0, left or 10.0))
            await self.refresh()
        return self.view

    async def logs(self, follow: bool = False, tail: int | None = None) -> AsyncIterator[str]:
        steps = _log_steps(self.view.id, None, follow, 10.0, tail)
        reply = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            reply = None
            if step[0] == "get":
                reply = await self.client.logs(self.view.id, **step[1])
            elif step[0] == "out":
                yield step[1][1].decode("utf-8", "replace")

    async def outputs(self) -> list[OutputView]:
        return await self.client.outputs(self.view.id)

    async def cancel(self) -> JobView:
        self.view = await self.client.cancel(self.view.id)
        return self.view
