"""Fleets: the fleet file (FleetSpec) and how a fleet looks."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from corral.api.common import NAME_PATTERN, Strict

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
        default=None,
        description="S3-compatible store for outputs no instance can take: "
        "endpoint, bucket, access_key, secret_key, region",
    )

    @model_validator(mode="after")
    def _range(self) -> FleetSpec:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is above max_size ({self.max_size})")
        if self.durable is not None:
            missing = {"endpoint", "bucket"} - self.durable.keys()
            if missing:
                raise ValueError(f"durable: missing {', '.join(sorted(missing))}")
            unknown = self.durable.keys() - DURABLE_KEYS
            if unknown:
                raise ValueError(
                    f"durable: unknown setting(s) {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(sorted(DURABLE_KEYS))}"
                )
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
