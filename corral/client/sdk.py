"""The Python SDK: everything the CLI does, as method calls.

from corral.client.sdk import Client
c = Client()                      # CORRAL_SERVER / CORRAL_TOKEN or ~/.corral
job = c.submit(["python", "-c", "print(42)"])
final = c.follow(job.id, on_output=lambda stream, data: print(data.decode(), end=""))
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from corral.api.jobs import JobSubmit, JobView, LogPage
from corral.client.config import resolve
from corral.domain.jobs import FINAL_JOB_STATES

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
    )


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


def _verify(url: str) -> bool:
    """Certificate verification for https:// servers. A plain http:// server has no TLS
    to verify (and redirects are not followed), so the client skips building an SSL
    context it would never use: loading the CA bundle is a third of a CLI command's
    start-up."""
    return not url.startswith("http://")


class CorralError(Exception):
    """An error answer from the server, or no answer at all."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Client:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 30.0):
        cfg = resolve(server, token)
        self.server = cfg.server
        self.token_source = cfg.token_source
        headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
        self._http = httpx.Client(
            base_url=cfg.server, headers=headers, timeout=timeout, verify=_verify(cfg.server)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json=None, params=None, timeout=None, content=None):
        try:
            kwargs = {"json": json, "params": params}
            if content is not None:
                kwargs["content"] = content
            if timeout is not None:
                kwargs["timeout"] = timeout
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CorralError(
                f"cannot reach the corral server at {self.server} ({exc.__class__.__name__}). "
                "Is it running? Start one with `corral up`, or set CORRAL_SERVER."
            ) from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                message, code = err["message"], err["code"]
            except (ValueError, KeyError, TypeError):
                message, code = resp.text[:500] or resp.reason_phrase, None
            if resp.status_code == 401:
                message += (
                    f" (token from {self.token_source}; set CORRAL_TOKEN or pass "
                    "--token with the server's admin token)"
                )
            raise CorralError(message, status=resp.status_code, code=code)
        return resp.json()

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, command: list[str], **options) -> JobView:
        spec = JobSubmit(command=command, **options)
        return JobView.model_validate(
            self._call("POST", "/api/v1/jobs", json=spec.model_dump(exclude_defaults=True))
        )

    def jobs(
        self, states: list[str] | None = None, limit: int = 100, before: int | None = None
    ) -> list[JobView]:
        params = {"limit": limit, "state": states or []}
        if before is not None:
            params["before"] = before
        return [JobView.model_validate(j) for j in self._call("GET", "/api/v1/jobs", params=params)]

    def job(self, job_id: int) -> JobView:
        return JobView.model_validate(self._call("GET", f"/api/v1/jobs/{job_id}"))

    def cancel(self, job_id: int) -> JobView:
        return JobView.model_validate(self._call("POST", f"/api/v1/jobs/{job_id}/cancel"))

    def requeue(self, job_id: int) -> JobView:
        return JobView.model_validate(self._call("POST", f"/api/v1/jobs/{job_id}/requeue"))

    def logs(
        self, job_id: int, *, attempt: int | None = None, after: int = -1, wait: float = 0
    ) -> LogPage:
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
        following, after = attempt or 0, -1
        if tail is not None:
            held: list[tuple[str, bytes]] = []
            while True:
                page = self.logs(job_id, attempt=following or None, after=after)
                if not following and page.attempt:
                    following = page.attempt
                if not page.chunks:
                    break
                held += [(c.stream, base64.b64decode(c.data)) for c in page.chunks]
                after = page.next_seq
            for stream, data in last_lines(held, tail):
                on_output(stream, data)
            if not until_final:
                return page
        while True:
            page = self.logs(
                job_id, attempt=following or None, after=after, wait=wait if until_final else 0
            )
            if not following and page.attempt:
                following = page.attempt
            for chunk in page.chunks:
                on_output(chunk.stream, base64.b64decode(chunk.data))
            after = page.next_seq
            if page.chunks:
                continue
            moved_on = page.current_attempt and page.current_attempt != following
            if attempt is None and moved_on:
                if following and on_notice:
                    on_notice(
                        f"attempt {following} ended; following attempt {page.current_attempt}"
                    )
                following, after = page.current_attempt, -1
                continue
            if not until_final or page.job_state in FINAL_JOB_STATES or moved_on:
                return page

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
                "GET", f"/api/v1/objects/{sha256}/content", timeout=httpx.Timeout(30, read=600)
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
