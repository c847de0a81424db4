"""Fleets: the fleet file (FleetSpec, which parses the YAML file itself and is the body
of PUT /api/v1/fleets/NAME), an SSH fleet's hosts, and how a fleet looks.

Every key is checked: an unknown setting, an unknown backend or a host setting on a
fleet that has no hosts is an error that names it (and what is known), never ignored.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from corral.api.common import NAME_PATTERN, Strict, Wire, parse_memory_mb

BACKENDS = ("local", "ssh")  # where instances come from
DURABLE_KEYS = {"endpoint", "bucket", "access_key", "secret_key", "region"}
DEFAULT_PEER_PORT = 8471

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,252})$|^\[?[0-9A-Fa-f:.]+\]?$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_TARGET = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$")


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_fleet", "{message}", {"message": message})


def _check_keys(data: Any, known: list[str], what: str) -> None:
    if isinstance(data, dict):
        unknown = [k for k in data if k not in known]
        if unknown:
            raise PydanticCustomError(
                "unknown_setting",
                "unknown setting(s) {unknown} in {what}; known: {known}",
                {"unknown": ", ".join(map(str, unknown)), "what": what, "known": ", ".join(known)},
            )


def _memory(value: Any, where: str) -> int:
    try:
        return parse_memory_mb(str(value))
    except ValueError as exc:
        raise PydanticCustomError(
            "memory", "{where}: {why}", {"where": where, "why": str(exc)}
        ) from None


def split_target(text: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` -> (user, host, port)."""
    m = _TARGET.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not [user@]host[:port]")
    port = int(m["port"]) if m["port"] else None
    return m["user"], m["host"].strip("[]"), port


HOST_KEYS = [
    "host",
    "port",
    "user",
    "identity_file",
    "agent_forwarding",
    "proxy_jump",
    "cpus",
    "memory",
    "memory_mb",
    "labels",
    "python",
    "prefix",
    "data_dir",
    "peer_port",
    "peer_url",
]


class SshHost(Strict):
    """One machine of an SSH fleet. In the fleet file a host is a mapping of these
    settings, or the short form `[user@]host[:port]`."""

    host: str = Field(max_length=253, description="address or name the server connects to")
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(default="root", description="login; root installs the systemd unit")
    identity_file: str | None = Field(
        default=None,
        max_length=4096,
        description="private key file on the server's machine (default: the server's "
        "SSH agent and ~/.ssh keys)",
    )
    agent_forwarding: bool = Field(default=False, description="forward the server's SSH agent")
    proxy_jump: str | None = Field(
        default=None, description="[user@]host[:port] to connect through (ssh -J)"
    )
    cpus: float | None = Field(default=None, gt=0, description="cpus the agent offers")
    memory_mb: int | None = Field(default=None, gt=0, description="memory the agent offers")
    labels: dict[str, str] = Field(
        default_factory=dict, description="recorded with the fleet; not used for placement yet"
    )
    python: str = Field(default="python3", max_length=4096, description="the host's Python")
    prefix: str | None = Field(
        default=None,
        max_length=4096,
        description="where the agent build is installed (default /usr/local/bin as root, "
        "~/.local/bin otherwise)",
    )
    data_dir: str | None = Field(
        default=None,
        max_length=4096,
        description="under it, one data dir per instance (default /var/lib/corral-agent "
        "as root, ~/.local/share/corral-agent otherwise)",
    )
    peer_port: int = Field(default=DEFAULT_PEER_PORT, ge=1, le=65535)
    peer_url: str | None = Field(
        default=None, description="how other agents reach this one (default http://HOST:PEER_PORT)"
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, str):
            try:
                user, host, port = split_target(data)
            except ValueError as exc:
                raise PydanticCustomError("host", "{why}", {"why": str(exc)}) from None
            return {
                k: v for k, v in {"host": host, "user": user, "port": port}.items() if v is not None
            }
        _check_keys(data, HOST_KEYS, "a host")
        if isinstance(data, dict) and "memory" in data:
            if "memory_mb" in data:
                raise PydanticCustomError("memory", "give memory or memory_mb, not both", {})
            data = {**data, "memory_mb": _memory(data["memory"], "memory")}
            del data["memory"]
        return data

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not _HOST.match(v):
            raise ValueError(f"{v!r} is not a host name or address")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not _USER.match(v):
            raise ValueError(f"{v!r} is not a user name")
        return v

    @field_validator("proxy_jump")
    @classmethod
    def _jump(cls, v: str | None) -> str | None:
        if v is not None:
            split_target(v)
        return v

    @field_validator("prefix", "data_dir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r}: must be an absolute path on the host")
        return v

    @field_validator("peer_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @property
    def ref(self) -> str:
        """The backend reference of this machine: ssh:USER@HOST:PORT."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh:{self.user}@{host}:{self.port}"


class SshSettings(Strict):
    """What an SSH fleet stores beside its size (fleets.spec["ssh"])."""

    hosts: list[SshHost]
    known_hosts: str | None = None
    wipe: bool = False
    min_free_mb: int = 200


# The fleet file's keys, as a person writes them (min/max, instance: {cpus, memory}).
FILE_KEYS = [
    "name",
    "backend",
    "min",
    "max",
    "idle_timeout",
    "instance",
    "durable",
    "hosts",
    "known_hosts",
    "wipe",
    "min_free_mb",
]
SSH_KEYS = ("hosts", "known_hosts", "wipe", "min_free_mb")


class FleetSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    backend: str = Field(default="local", description=f"one of: {', '.join(BACKENDS)}")
    min_size: int = Field(
        default=0, ge=0, le=10000, validation_alias=AliasChoices("min_size", "min")
    )
    max_size: int = Field(
        default=1, ge=0, le=10000, validation_alias=AliasChoices("max_size", "max")
    )
    idle_timeout: float = Field(default=300.0, gt=0)
    cpus: float | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, ge=0)
    durable: dict[str, str] | None = Field(
        default=None,
        description="S3-compatible store for outputs no instance can take: "
        "endpoint, bucket, access_key, secret_key, region",
    )
    hosts: list[SshHost] | None = Field(
        default=None, description="ssh: the machines; min/max count instances over them"
    )
    known_hosts: str | None = Field(
        default=None,
        description="ssh: a known_hosts file on the server's machine; only its keys are "
        "trusted (default: DATA_DIR/known_hosts, where a new host's key is recorded "
        "on first contact and a changed key is refused)",
    )
    wipe: bool = Field(default=False, description="ssh: delete an instance's data dir on retire")
    min_free_mb: int = Field(
        default=200, ge=0, description="ssh: free disk an agent's data dir needs"
    )

    @model_validator(mode="before")
    @classmethod
    def _file_form(cls, data: Any) -> Any:
        """Accept the fleet file's layout: `min`, `max`, `instance: {cpus, memory}`."""
        if not isinstance(data, dict):
            return data
        if any(k not in cls.model_fields for k in data):  # API names are accepted too
            _check_keys(data, FILE_KEYS, "the fleet")
        if "instance" in data:
            shape = data["instance"] or {}
            if not isinstance(shape, dict):
                raise PydanticCustomError("instance", "instance: expected {{cpus, memory}}", {})
            _check_keys(shape, ["cpus", "memory"], "instance")
            data = {k: v for k, v in data.items() if k != "instance"}
            if "cpus" in shape:
                data["cpus"] = shape["cpus"]
            if shape.get("memory") is not None:
                data["memory_mb"] = _memory(shape["memory"], "instance.memory")
        return data

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise PydanticCustomError(
                "unknown_backend",
                "unknown backend '{backend}'; known backends: {known}",
                {"backend": v, "known": ", ".join(BACKENDS)},
            )
        return v

    @model_validator(mode="after")
    def _range(self) -> FleetSpec:
        if self.min_size > self.max_size:
            raise _invalid(f"min ({self.min_size}) is above max ({self.max_size})")
        if self.durable is not None:
            missing = {"endpoint", "bucket"} - self.durable.keys()
            if missing:
                raise _invalid(f"durable: missing {', '.join(sorted(missing))}")
            unknown = self.durable.keys() - DURABLE_KEYS
            if unknown:
                raise _invalid(
                    f"durable: unknown setting(s) {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(sorted(DURABLE_KEYS))}"
                )
            if not self.durable["endpoint"].startswith(("http://", "https://")):
                raise _invalid("durable.endpoint: must be an http:// or https:// URL")
        if self.backend == "ssh":
            if not self.hosts:
                raise _invalid("hosts: an ssh fleet needs at least one host")
            if self.max_size > len(self.hosts):
                raise _invalid(
                    f"max ({self.max_size}) is above the number of hosts ({len(self.hosts)}): "
                    "an ssh fleet runs at most one instance per host"
                )
            refs = [h.ref for h in self.hosts]
            twice = sorted({r for r in refs if refs.count(r) > 1})
            if twice:
                raise _invalid(f"hosts: listed twice: {', '.join(twice)}")
        else:
            given = [k for k in SSH_KEYS if getattr(self, k) != type(self).model_fields[k].default]
            if given:
                raise _invalid(
                    f"{', '.join(given)}: only an ssh fleet has these (backend is {self.backend})"
                )
        return self

    def settings(self) -> dict[str, Any]:
        """What the store keeps beside the size: the durable store, the SSH hosts."""
        out: dict[str, Any] = {}
        if self.durable:
            out["durable"] = self.durable
        if self.backend == "ssh" and self.hosts:
            out["ssh"] = SshSettings(
                hosts=self.hosts,
                known_hosts=self.known_hosts,
                wipe=self.wipe,
                min_free_mb=self.min_free_mb,
            ).model_dump()
        return out


class FleetView(Wire):
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
    hosts: list[str] = Field(default_factory=list, description="ssh: the hosts (USER@HOST:PORT)")


class ScaleRequest(Strict):
    size: int = Field(ge=0, le=10000)
