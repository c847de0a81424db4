"""Wire models shared by the server, the agent and the client (pure data, no I/O)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62})$"


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
    inputs: list[str] = Field(default_factory=list, description="object ids fetched before start")

    @field_validator("command")
    @classmethod
    def _argv0(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("command[0] must not be empty")
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
    wait: float = Field(default=0.0, ge=0, le=60, description="hold the reply this long if idle")


class StartOrder(BaseModel):
    job_id: int
    attempt: int
    token: str
    command: list[str]
    env: dict[str, str]
    cpus: float
    memory_mb: int


class KillOrder(BaseModel):
    job_id: int
    attempt: int
    reason: str


class HeartbeatReply(BaseModel):
    action: Literal["continue", "exit"]
    reason: str = ""
    interval: float
    state: str | None = None
    start: list[StartOrder] = Field(default_factory=list)
    kill: list[KillOrder] = Field(default_factory=list)
    install: list["InstallOrder"] = Field(default_factory=list)


# ---- runner protocol (fenced by the attempt token) -------------------------------------


class LogChunkIn(Strict):
    seq: int = Field(ge=0)
    stream: Literal["out", "err"]
    data: str = Field(max_length=4 * 1024 * 1024, description="base64")


class LogBatch(Strict):
    chunks: list[LogChunkIn] = Field(max_length=1000)


class AttemptFinish(Strict):
    exit_code: int | None = None
    reason: str | None = Field(default=None, max_length=4000)


class AttemptLost(Strict):
    reason: str = Field(max_length=4000)


class AttemptAck(BaseModel):
    job_id: int
    attempt: int
    job_state: str
    recorded: bool = True


# ---- components and rollouts -------------------------------------------------------------

SHA256_PATTERN = r"^[0-9a-f]{64}$"


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
