"""Instances, servers and events as the API shows them; drain requests and replies."""

from __future__ import annotations

from pydantic import Field

from corral.api.common import Strict, Timestamp, Wire
from corral.domain.instances import InstanceState
from corral.domain.provisioning import ProvisionState


class InstanceView(Wire):
    id: str
    name: str
    fleet: str | None
    state: InstanceState
    lost: bool
    incarnation: int
    cpus: float
    memory_mb: int
    running_attempts: int
    host: str | None
    agent_version: str | None
    registered_at: Timestamp | None
    last_heartbeat_at: Timestamp | None
    drain_requested_at: Timestamp | None = None
    retired_at: Timestamp | None = None
    message: str | None = None
    backend_ref: str | None = Field(
        default=None, description="its machine, as its backend names it (ssh:USER@HOST:PORT)"
    )
    provision_state: ProvisionState | None = Field(
        default=None, description="the backend's work on its machine (None: not provisioned)"
    )
    provision_error: str | None = Field(default=None, description="the last provisioning error")
    provision_attempts: int = 0
    provision_next_at: Timestamp | None = Field(default=None, description="when it is retried")
    sandbox: str | None = Field(default=None, description="how its agent contains attempts")


class ServerView(Wire):
    id: str
    build_version: str
    host: str
    pid: int
    url: str | None
    started_at: Timestamp
    last_seen_at: Timestamp
    alive: bool


class EventView(Wire):
    id: int
    ts: Timestamp
    level: str
    kind: str
    message: str
    job_id: int | None = None
    instance_id: str | None = None
    server_id: str | None = None


class DrainRequest(Strict):
    force: bool = False


class AtRisk(Wire):
    sha256: str
    size: int
    names: list[str]


class DrainView(Wire):
    instance: InstanceView
    at_risk: list[AtRisk] = Field(
        default_factory=list, description="objects only this instance holds right now"
    )
