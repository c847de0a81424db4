"""The agent protocol: register, then heartbeat (observed state up, desired state down)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from corral.api.common import NAME_PATTERN, Sha256, Strict, Wire
from corral.api.components import InstallOrder, ObservedComponent
from corral.api.objects import Fetch, ObjectError
from corral.domain.instances import InstanceState
from corral.domain.sandbox import DEFAULT_LOG_LIMIT


class RegisterRequest(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    instance_id: str | None = None
    cpus: float = Field(gt=0, le=1024)
    memory_mb: int = Field(ge=0)
    host: str | None = Field(default=None, max_length=255)
    agent_version: str | None = Field(default=None, max_length=100)
    fleet: str | None = Field(default=None, pattern=NAME_PATTERN)
    peer_url: str | None = Field(default=None, max_length=500)
    sandbox: str | None = Field(
        default=None, max_length=500, description="how this agent contains its attempts"
    )
    sandbox_warnings: list[Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=list, max_length=20, description="what it cannot isolate here"
    )
    join_key: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{16,128}$",
        description="a secret the joining agent picked (once per data dir): a retried "
        "join with the same name, key and join token gets the same instance",
    )


class RegisterReply(Wire):
    action: Literal["welcome", "exit"]
    reason: str
    instance_id: str | None = None
    incarnation: int | None = None
    credential: str | None = Field(default=None, description="sent once, on first registration")
    interval: float = 2.0
    lease_interval: float | None = Field(
        default=None,
        description="renew the lease (POST /api/v1/agents/lease) this often from now on, "
        "also while the first exchange waits or is refused; None: exchanges renew it",
    )
    state: InstanceState | None = None


class ObservedAttempt(Strict):
    job_id: int
    attempt: int = Field(ge=1)
    token: str = Field(max_length=200)


class HeartbeatRequest(Strict):
    instance_id: str
    incarnation: int
    attempts: list[ObservedAttempt] = Field(default_factory=list)
    components: list[ObservedComponent] = Field(default_factory=list)
    objects: list[str] | None = Field(
        default=None,
        description="sha256 of every object held; None: unchanged since the last heartbeat",
    )
    object_errors: list[ObjectError] = Field(default_factory=list)
    offloaded: list[Sha256] = Field(
        default_factory=list,
        max_length=10_000,
        description="sha256 of objects uploaded to a durable store "
        "as ordered, since the last heartbeat",
    )
    offload_errors: list[ObjectError] = Field(default_factory=list, max_length=10_000)
    wait: float = Field(
        default=0.0,
        ge=0,
        le=600,  # the exchange interval grows up to 300 s at scale (domain.heartbeat)
        description="hold the reply this long if idle",
    )
    renews_every: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="the lease interval this agent renews at between exchanges "
        "(POST /api/v1/agents/lease); None: it renews only by exchanging",
    )


class StartOrder(Wire):
    job_id: int
    attempt: int
    token: str
    command: list[str]
    env: dict[str, str]
    cpus: float
    memory_mb: int
    inputs: list[Fetch] = Field(default_factory=list)
    workdir: Fetch | None = None
    log_limit: int = DEFAULT_LOG_LIMIT


class KillOrder(Wire):
    job_id: int
    attempt: int
    reason: str


class OffloadOrder(Wire):
    """Upload an object held here to a durable store: PUT its bytes to `url` (signed,
    short-lived) with exactly `headers`."""

    sha256: str
    size: int
    url: str
    headers: dict[str, str] = Field(default_factory=dict)


class HeartbeatReply(Wire):
    action: Literal["continue", "exit"]
    reason: str = ""
    interval: float
    lease_interval: float | None = Field(
        default=None,
        description="renew the lease (POST /api/v1/agents/lease) this often between "
        "exchanges; None: every exchange renews it, no renewals needed",
    )
    state: InstanceState | None = None
    start: list[StartOrder] = Field(default_factory=list)
    kill: list[KillOrder] = Field(default_factory=list)
    install: list[InstallOrder] = Field(default_factory=list)
    replicate: list[Fetch] = Field(default_factory=list)
    offload: list[OffloadOrder] = Field(default_factory=list)
