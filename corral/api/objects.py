"""Objects (outputs and uploads), their replicas, and how an agent fetches one."""

from __future__ import annotations

from pydantic import Field

from corral.api.common import SHA256_PATTERN, Sha256, Strict, Timestamp, Wire
from corral.domain.drain import ObjectState, ReplicaState
from corral.domain.instances import InstanceState


class ReplicaView(Wire):
    instance_id: str
    instance_name: str
    instance_state: InstanceState
    state: ReplicaState
    created_at: Timestamp


class ObjectView(Wire):
    sha256: str
    size: int
    name: str | None
    origin: str
    state: ObjectState
    durable: bool
    replicas: list[ReplicaView] = Field(default_factory=list)


class OutputView(Wire):
    path: str
    sha256: str
    size: int
    attempt: int
    state: ObjectState
    copies: int = Field(description="present replicas on instances not retired (+1 if durable)")
    durable: bool = Field(default=False, description="a copy is in the fleet's durable store")


class CopiesLanded(Strict):
    """An agent's report, at once, of ordered copies it has fetched and hashed (its
    heartbeats report them too; this saves the wait for the next one)."""

    instance_id: str = Field(max_length=64)
    incarnation: int
    sha256s: list[Sha256] = Field(min_length=1, max_length=1000)


class PeerVerify(Strict):
    sha256: str = Field(pattern=SHA256_PATTERN)
    token: str = Field(max_length=200)
    recipient: str | None = Field(
        default=None, max_length=64, description="the instance the bearer fetches for"
    )


class ObjectError(Strict):
    sha256: str = Field(pattern=SHA256_PATTERN)
    error: str = Field(max_length=4000)


class Fetch(Wire):
    """Where to get an object: peer URLs of instances holding it, and a one-time
    token the holder checks with the server (None when it is already local)."""

    sha256: str
    size: int
    name: str
    sources: list[str] = Field(default_factory=list)
    token: str | None = None
