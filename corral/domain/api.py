"""Wire models shared by the server, the agent and the client (pure data, no I/O)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62})$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- jobs ---------------------------------------------------------------------------


class JobSubmit(Strict):
    command: list[str] = Field(min_length=1, description="argv of the command to run")
    name: str | None = Field(default=None, max_length=200)
    fleet: str | None = Field(default=None, pattern=NAME_PATTERN)
    cpus: float = Field(default=1.0, gt=0, le=1024)
    memory_mb: int = Field(default=0, ge=0, le=16 * 1024 * 1024)
    max_attempts: int = Field(default=3, ge=1, le=100)
    env: dict[str, str] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list, max_length=1000,
                              description="object ids (sha256) fetched before the command starts")

    @field_validator("command")
    @classmethod
    def _argv0(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("command[0] must not be empty")
        return v

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:
        import re

        for ref in v:
            if not re.match(SHA256_PATTERN, ref):
                raise ValueError(f"{ref!r} is not an object id (64 lowercase hex digits)")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"invalid environment variable name: {key!r}")
        return v


class AttemptView(BaseModel):
    number: int
    instance_id: str | None
    state: str
    exit_code: int | None = None
    reason: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class JobView(BaseModel):
    id: int
    name: str | None
    state: str
    command: list[str]
    fleet: str | None
    cpus: float
    memory_mb: int
    max_attempts: int
    attempt: int = Field(description="number of the current (or last) attempt; 0 before the first")
    instance_id: str | None
    exit_code: int | None
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_attempt: int | None = Field(description="the attempt whose result is recorded")
    attempts: list[AttemptView] = Field(default_factory=list)


class LogChunkView(BaseModel):
    seq: int
    stream: Literal["out", "err"]
    data: str  # base64


class LogPage(BaseModel):
    job_id: int
    attempt: int
    chunks: list[LogChunkView]
    next_seq: int
    job_state: str
    current_attempt: int
    exit_code: int | None
    reason: str | None


# ---- instances, servers, events -------------------------------------------------------


class InstanceView(BaseModel):
    id: str
    name: str
    fleet: str | None
    state: str
    lost: bool
    incarnation: int
    cpus: float
    memory_mb: int
    running_attempts: int
    host: str | None
    agent_version: str | None
    registered_at: float | None
    last_heartbeat_at: float | None
    drain_requested_at: float | None = None
    retired_at: float | None = None
    message: str | None = None


class ServerView(BaseModel):
    id: str
    build_version: str
    host: str
    pid: int
    url: str | None
    started_at: float
    last_seen_at: float
    alive: bool


class EventView(BaseModel):
    id: int
    ts: float
    level: str
    kind: str
    message: str
    job_id: int | None = None
    instance_id: str | None = None
    server_id: str | None = None


class DrainRequest(Strict):
    force: bool = False


class AtRisk(BaseModel):
    sha256: str
    size: int
    names: list[str]


class DrainView(BaseModel):
    instance: "InstanceView"
    at_risk: list[AtRisk] = Field(default_factory=list,
                                  description="objects only this instance holds right now")


class ReplicaView(BaseModel):
    instance_id: str
    instance_name: str
    instance_state: str
    state: str
    created_at: float


class ObjectView(BaseModel):
    sha256: str
    size: int
    name: str | None
    origin: str
    state: str
    durable: bool
    replicas: list[ReplicaView] = Field(default_factory=list)


class OutputView(BaseModel):
    path: str
    sha256: str
    size: int
    attempt: int
    state: str
    copies: int = Field(description="present replicas on instances not retired (+1 if durable)")
    durable: bool = Field(default=False, description="a copy is in the fleet's durable store")


DURABLE_KEYS = {"endpoint", "bucket", "access_key", "secret_key", "region"}


class FleetSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    backend: str = Field(default="local", pattern=NAME_PATTERN)
    min_size: int = Field(default=0, ge=0, le=10000)
    max_size: int = Field(default=1, ge=0, le=10000)
    idle_timeout: float = Field(default=300.0, gt=0)
    cpus: float | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, ge=0)
    durable: dict[str, str] | None = Field(
        default=None, description="S3-compatible store for outputs no instance can take: "
        "endpoint, bucket, access_key, secret_key, region")

    @model_validator(mode="after")
    def _range(self) -> "FleetSpec":
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is above max_size ({self.max_size})")
        if self.durable is not None:
            missing = {"endpoint", "bucket"} - self.durable.keys()
            if missing:
                raise ValueError(f"durable: missing {', '.join(sorted(missing))}")
            unknown = self.durable.keys() - DURABLE_KEYS
            if unknown:
                raise ValueError(f"durable: unknown setting(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(sorted(DURABLE_KEYS))}")
            if not self.durable["endpoint"].startswith(("http://", "https://")):
                raise ValueError("durable.endpoint: must be an http:// or https:// URL")
        return self


class FleetView(BaseModel):
    name: str
    backend: str
    min_size: int
    max_size: int
    target_size: int
    idle_timeout: float
    cpus: float | None
    memory_mb: int | None
    durable: bool
    pending: int
    running: int
    draining: int


class ScaleRequest(Strict):
    size: int = Field(ge=0, le=10000)


class PeerVerify(Strict):
    sha256: str = Field(pattern=SHA256_PATTERN)
    token: str = Field(max_length=200)


class ObjectError(Strict):
    sha256: str = Field(pattern=SHA256_PATTERN)
    error: str = Field(max_length=4000)


# ---- agent protocol -------------------------------------------------------------------


class RegisterRequest(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    instance_id: str | None = None
    cpus: float = Field(gt=0, le=1024)
    memory_mb: int = Field(ge=0)
    host: str | None = Field(default=None, max_length=255)
    agent_version: str | None = Field(default=None, max_length=100)
    fleet: str | None = Field(default=None, pattern=NAME_PATTERN)
    peer_url: str | None = Field(default=None, max_length=500)


class RegisterReply(BaseModel):
    action: Literal["welcome", "exit"]
    reason: str
    instance_id: str | None = None
    incarnation: int | None = None
    credential: str | None = Field(default=None, description="sent once, on first registration")
    interval: float = 2.0
    state: str | None = None


class ObservedAttempt(Strict):
    job_id: int
    attempt: int = Field(ge=1)
    token: str = Field(max_length=200)


class HeartbeatRequest(Strict):
    instance_id: str
    incarnation: int
    attempts: list[ObservedAttempt] = Field(default_factory=list)
    components: list["ObservedComponent"] = Field(default_factory=list)
    objects: list[str] | None = Field(default=None, description="sha256 of every object held; "
                                      "None: unchanged since the last heartbeat")
    object_errors: list["ObjectError"] = Field(default_factory=list)
    offloaded: list[Sha256] = Field(default_factory=list, max_length=10_000,
                                 description="sha256 of objects uploaded to a durable store "
                                 "as ordered, since the last heartbeat")
    offload_errors: list["ObjectError"] = Field(default_factory=list, max_length=10_000)
    wait: float = Field(default=0.0, ge=0, le=60, description="hold the reply this long if idle")


class Fetch(BaseModel):
    """Where to get an object: peer URLs of instances holding it, and a one-time
    token the holder checks with the server (None when it is already local)."""

    sha256: str
    size: int
    name: str
    sources: list[str] = Field(default_factory=list)
    token: str | None = None


class StartOrder(BaseModel):
    job_id: int
    attempt: int
    token: str
    command: list[str]
    env: dict[str, str]
    cpus: float
    memory_mb: int
    inputs: list[Fetch] = Field(default_factory=list)


class KillOrder(BaseModel):
    job_id: int
    attempt: int
    reason: str


class OffloadOrder(BaseModel):
    """Upload an object held here to a durable store: PUT its bytes to `url` (signed,
    short-lived) with exactly `headers`."""

    sha256: str
    size: int
    url: str
    headers: dict[str, str] = Field(default_factory=dict)


class HeartbeatReply(BaseModel):
    action: Literal["continue", "exit"]
    reason: str = ""
    interval: float
    state: str | None = None
    start: list[StartOrder] = Field(default_factory=list)
    kill: list[KillOrder] = Field(default_factory=list)
    install: list["InstallOrder"] = Field(default_factory=list)
    replicate: list[Fetch] = Field(default_factory=list)
    offload: list[OffloadOrder] = Field(default_factory=list)


# ---- runner protocol (fenced by the attempt token) -------------------------------------


class LogChunkIn(Strict):
    seq: int = Field(ge=0)
    stream: Literal["out", "err"]
    data: str = Field(max_length=4 * 1024 * 1024, description="base64")


class LogBatch(Strict):
    chunks: list[LogChunkIn] = Field(max_length=1000)


class OutputFile(Strict):
    path: str = Field(min_length=1, max_length=1000, description="relative to the output dir")
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        parts = v.split("/")
        if v.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in v:
            raise ValueError(f"{v!r} must be a plain relative path")
        return v


class AttemptFinish(Strict):
    exit_code: int | None = None
    reason: str | None = Field(default=None, max_length=4000)
    outputs: list[OutputFile] = Field(default_factory=list, max_length=100_000)


class AttemptLost(Strict):
    reason: str = Field(max_length=4000)


class AttemptAck(BaseModel):
    job_id: int
    attempt: int
    job_state: str
    recorded: bool = True


# ---- components and rollouts -------------------------------------------------------------

class ComponentPublish(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(max_length=128)
    url: str = Field(max_length=2000, pattern=r"^https?://[^\s]+$")
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int | None = Field(default=None, ge=0)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        from corral.domain.versions import parse_version

        parse_version(v)  # raises InvalidVersion (a ValueError) with the reason
        return v


class ComponentView(BaseModel):
    name: str
    version: str
    scheme: str
    url: str
    sha256: str
    size: int | None
    created_at: float


class RolloutRequest(Strict):
    component: str = Field(pattern=NAME_PATTERN)
    version: str = Field(max_length=128)
    fleet: str | None = Field(default=None, pattern=NAME_PATTERN,
                              description="one fleet; default: every fleet without its own")
    max_unavailable: int = Field(default=1, ge=1, le=10000,
                                 description="instances installing at once")
    failure_threshold: int = Field(default=0, ge=0,
                                   description="pause once more instances than this failed")
    downgrade: bool = Field(default=False, description="allow going to a lower version")
    force: bool = Field(default=False,
                        description="allow a version of another scheme or channel")


class RolloutProgress(BaseModel):
    total: int = 0
    converged: int = 0
    in_flight: int = 0
    failed: int = 0
    held: int = 0
    waiting: int = 0


class RolloutView(BaseModel):
    id: int
    component: str
    version: str
    fleet: str
    previous_version: str | None
    state: str
    max_unavailable: int
    failure_threshold: int
    allow_downgrade: bool
    created_at: float
    updated_at: float
    message: str | None
    progress: RolloutProgress = Field(default_factory=RolloutProgress)


class InstanceComponentView(BaseModel):
    instance_id: str
    instance_name: str
    component: str
    observed_version: str | None
    observed_sha256: str | None
    target_version: str | None
    state: str
    attempts: int
    orders_total: int
    last_error: str | None


class ObservedComponent(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(default=None, max_length=128)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    error: str | None = Field(default=None, max_length=4000,
                              description="why the last install of the target failed")
    error_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)


class InstallOrder(BaseModel):
    component: str
    version: str
    url: str
    sha256: str
    size: int | None
    order: int = Field(description="how many orders this target has had (1-based)")


HeartbeatRequest.model_rebuild()
HeartbeatReply.model_rebuild()
DrainView.model_rebuild()
