"""The agent's identity on disk, and the tombstone that keeps a retired agent down."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.domain.instances import TOMBSTONE_FILE

IDENTITY_FILE = "identity.json"
JOIN_KEY_FILE = "join.key"


@dataclass
class Identity:
    instance_id: str
    credential: str
    name: str


def write_json_atomic(path: Path, data: dict, mode: int = 0o600, durable: bool = True) -> None:
    """Readers see the old file or the whole new one, never a torn one. `durable`
    also survives a power cut (fsync); per-attempt bookkeeping does without. (Plain
    system calls: a file object and a mkdir on every write doubled its cost, and the
    agent, the zygote and each runner write several per attempt.)"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, mode)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def load_identity(data_dir: Path) -> Identity | None:
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Identity(data["instance_id"], data["credential"], data["name"])


def save_identity(data_dir: Path, identity: Identity) -> None:
    write_json_atomic(data_dir / IDENTITY_FILE, asdict(identity))


def join_key(data_dir: Path) -> str:
    """The secret this data dir joins with, picked once and kept (0600): a join retried
    after its answer was lost (a timeout, a crash) presents it again and is given the
    same instance instead of "name in use"."""
    path = data_dir / JOIN_KEY_FILE
    try:
        key = path.read_text().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def read_tombstone(data_dir: Path) -> dict | None:
    path = data_dir / TOMBSTONE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"reason": "unreadable tombstone"}


def write_tombstone(data_dir: Path, instance_id: str | None, reason: str) -> None:
    write_json_atomic(
        data_dir / TOMBSTONE_FILE,
        {"instance_id": instance_id, "reason": reason, "at": time.time()},
        mode=0o644,
    )
