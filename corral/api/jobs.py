"""Jobs as users submit and see them, and what a runner reports about its attempt
(fenced by the attempt token)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from corral.api.common import NAME_PATTERN, SHA256_PATTERN, Sha256, Strict, Timestamp, Wire
from corral.domain.jobs import AttemptState, JobState
from corral.domain.sandbox import DEFAULT_LOG_LIMIT, text_problem

MAX_LOG_LIMIT = 2**40


class JobSubmit(Strict):
    command: list[str] = Field(min_length=1, description="argv of the command to run")
    name: str | None = Field(default=None, max_length=200)
    fleet: str | None = Field(default=None, pattern=NAME_PATTERN)
    cpus: float = Field(default=1.0, gt=0, le=1024)
    memory_mb: int = Field(default=0, ge=0, le=16 * 1024 * 1024)
    max_attempts: int = Field(default=3, ge=1, le=100)
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="environment values sealed with the server key at rest, handed only to "
        "the agent that runs the attempt, and never shown (`corral run --secret K=V`)",
    )
    inputs: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="object ids (sha256) fetched before the command starts",
    )
    workdir: Sha256 | None = Field(
        default=None,
        description="object id of a packed working directory (`corral run -w DIR`): the "
        "attempt starts in a private extracted copy, $CORRAL_WORKDIR",
    )
    log_limit: int = Field(
        default=DEFAULT_LOG_LIMIT,
        ge=1024,
        le=MAX_LOG_LIMIT,
        description="bytes of output kept per attempt; past it the log says so and the job goes on",
    )

    @field_validator("command")
    @classmethod
    def _argv0(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("command[0] must not be empty")
        for i, arg in enumerate(v):
            if why := text_problem(arg):
                raise ValueError(f"command[{i}] {why}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (why := text_problem(v)):
            raise ValueError(f"name {why}")
        return v

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:

        for ref in v:
            if not re.match(SHA256_PATTERN, ref):
                raise ValueError(f"{ref!r} is not an object id (64 lowercase hex digits)")
        return v

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if why := text_problem(key):
                raise ValueError(f"the name of variable {key!r} {why}")
            if not key or "=" in key:
                raise ValueError(f"invalid environment variable name: {key!r}")
            if why := text_problem(value):
                raise ValueError(f"the value of {key} {why}")
        return v

    @model_validator(mode="after")
    def _env_once(self) -> JobSubmit:
        both = sorted(self.env.keys() & self.secret_env.keys())
        if both:
            raise ValueError(f"secret_env: {', '.join(both)} also given in env")
        return self


MAX_BATCH = 10_000


class JobBatch(Strict):
    """Many jobs in one request, submitted in one transaction: all or none."""

    jobs: list[JobSubmit] = Field(min_length=1, max_length=MAX_BATCH)


class JobBatchReply(Wire):
    ids: list[int] = Field(description="the new jobs' ids, in the order submitted")


class AttemptView(Wire):
    number: int
    instance_id: str | None
    state: AttemptState
    exit_code: int | None = None
    reason: str | None = None
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    cpu_seconds: float | None = Field(default=None, description="CPU time of all its processes")
    peak_memory_mb: int | None = Field(default=None, description="peak memory of its cgroup")
    limits_enforced: str | None = Field(
        default=None, description="which of --cpus/--memory the host enforced"
    )
    notes: list[str] = Field(default_factory=list, description="e.g. outputs skipped, and why")


class JobView(Wire):
    id: int
    name: str | None
    state: JobState
    command: list[str]
    fleet: str | None
    cpus: float
    memory_mb: int
    max_attempts: int
    attempt: int = Field(description="number of the current (or last) attempt; 0 before the first")
    instance_id: str | None
    exit_code: int | None
    reason: str | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    result_attempt: int | None = Field(description="the attempt whose result is recorded")
    attempts: list[AttemptView] = Field(default_factory=list)
    workdir: str | None = None
    log_limit: int = DEFAULT_LOG_LIMIT
    secret_env: list[str] = Field(
        default_factory=list, description="names of its secret variables (values never shown)"
    )
    notes: list[str] = Field(
        default_factory=list, description="notes of the attempt whose result is recorded"
    )


class LogChunkView(Wire):
    seq: int
    stream: Literal["out", "err"]
    data: str  # base64


class LogPage(Wire):
    job_id: int
    attempt: int
    chunks: list[LogChunkView]
    next_seq: int
    job_state: JobState
    current_attempt: int
    exit_code: int | None
    reason: str | None


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
    notes: list[Annotated[str, Field(max_length=2000)]] = Field(default_factory=list, max_length=20)
    cpu_seconds: float | None = Field(default=None, ge=0)
    peak_memory_mb: int | None = Field(default=None, ge=0)
    limits_enforced: str | None = Field(default=None, max_length=200)
    chunks: list[LogChunkIn] = Field(
        default_factory=list,
        max_length=1000,
        description="the attempt's last log chunks (as POST .../logs takes them), stored "
        "with the result in one transaction, before it",
    )


class AttemptLost(Strict):
    reason: str = Field(max_length=4000)


class AttemptAck(Wire):
    job_id: int
    attempt: int
    job_state: str
    recorded: bool = True


MAX_RELAYED = 256  # reports in one relayed request
ATTEMPT_ACTIONS = ("start", "heartbeat", "logs", "finish", "lost")


class AttemptReport(Strict):
    """One runner's report, relayed by its agent: what POST
    /api/v1/jobs/{job_id}/attempts/{attempt}/{action} takes, with the attempt's token."""

    job_id: int = Field(ge=1)
    attempt: int = Field(ge=1)
    token: str = Field(min_length=1, max_length=200)
    action: Literal["start", "heartbeat", "logs", "finish", "lost"]
    body: dict[str, Any] | None = Field(
        default=None, description="the route's body: LogBatch, AttemptFinish or AttemptLost"
    )


class AttemptReports(Strict):
    reports: list[AttemptReport] = Field(min_length=1, max_length=MAX_RELAYED)


class AttemptReportResult(Wire):
    """What the route would have answered: its status and its body (an AttemptAck, or
    the error body)."""

    status: int
    body: dict[str, Any]


class AttemptReportsReply(Wire):
    results: list[AttemptReportResult] = Field(description="one per report, in order")
