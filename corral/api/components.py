"""Components, rollouts, and an instance's observed and target versions."""

from __future__ import annotations

from pydantic import Field, field_validator

from corral.api.common import NAME_PATTERN, SHA256_PATTERN, Strict, Timestamp, Wire
from corral.domain.reconcile import ComponentState, RolloutState


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


class ComponentView(Wire):
    name: str
    version: str
    scheme: str
    url: str
    sha256: str
    size: int | None
    created_at: Timestamp


class RolloutRequest(Strict):
    component: str = Field(pattern=NAME_PATTERN)
    version: str = Field(max_length=128)
    fleet: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="one fleet; default: every fleet without its own",
    )
    max_unavailable: int = Field(
        default=1, ge=1, le=10000, description="instances installing at once"
    )
    failure_threshold: int = Field(
        default=0, ge=0, description="pause once more instances than this failed"
    )
    downgrade: bool = Field(default=False, description="allow going to a lower version")
    force: bool = Field(default=False, description="allow a version of another scheme or channel")


class RolloutProgress(Wire):
    total: int = 0
    converged: int = 0
    in_flight: int = 0
    failed: int = 0
    held: int = 0
    waiting: int = 0


class RolloutView(Wire):
    id: int
    component: str
    version: str
    fleet: str
    previous_version: str | None
    state: RolloutState
    max_unavailable: int
    failure_threshold: int
    allow_downgrade: bool
    created_at: Timestamp
    updated_at: Timestamp
    message: str | None
    progress: RolloutProgress = Field(default_factory=RolloutProgress)


class InstanceComponentView(Wire):
    instance_id: str
    instance_name: str
    component: str
    observed_version: str | None
    observed_sha256: str | None
    target_version: str | None
    state: ComponentState
    attempts: int
    orders_total: int
    last_error: str | None


class ObservedComponent(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(default=None, max_length=128)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    error: str | None = Field(
        default=None, max_length=4000, description="why the last install of the target failed"
    )
    error_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)


class InstallOrder(Wire):
    component: str
    version: str
    url: str
    sha256: str
    size: int | None
    order: int = Field(description="how many orders this target has had (1-based)")
