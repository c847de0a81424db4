"""One server per SQLite file, enforced by an OS lock that dies with its holder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DatabaseInUse(RuntimeError):
    pass


class SqliteServerLock:
    """An exclusive flock on `<db>.server.lock`, held for the server's lifetime.

    The kernel releases it when the process exits, however it exits, so a crashed
    server never leaves the file locked.
    """

    def __init__(self, db_path: str):
        self.path = Path(db_path + ".server.lock")
        self._fd: int | None = None

    def acquire(self, holder: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            db = str(self.path)[: -len(".server.lock")]
            raise DatabaseInUse(
                f"the SQLite database {db} is already used by another corral server "
                f"({other}). SQLite supports one server; stop it, use another --data-dir, "
                f"or run several servers on PostgreSQL (--db postgresql://...)."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
