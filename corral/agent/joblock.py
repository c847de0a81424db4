"""A job's lock on this instance: a file in the agent's locks directory, held with
flock(2) by the runner of the job's attempt (so two runners of one job never run
here, whatever the agent believes).

The file goes when its holder is done, so that the directory does not grow by a
file per job ever run. Removing a locked file by its path is safe only with the
check that makes it so: a runner that opened the file before it was removed would
otherwise lock the removed file while another locks its replacement. So a lock is
held only once the file locked is still the one at the path (same inode), and a
file is removed only by whoever holds its lock, before letting it go."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

RETRY_EVERY = 0.1
OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


def _open(path: Path) -> int:
    try:
        return os.open(path, OPEN_FLAGS, 0o600)
    except FileNotFoundError:  # the first job on this agent: the locks dir is new
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(path, OPEN_FLAGS, 0o600)


def _still_there(fd: int, path: Path) -> bool:
    """Whether the file locked through `fd` is the one at `path` (not removed by its
    last holder between this process's open and its lock)."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def try_acquire(path: Path) -> int | None:
    """The lock's fd when it was free, else None (never waits)."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _still_there(fd, path):
            return fd
        os.close(fd)  # its holder removed it as this process opened it: a new one


def acquire(path: Path, wait: float, give_up: Callable[[], bool]) -> int | None:
    """The lock's fd, waiting up to `wait` seconds for its holder (None after that, or
    as soon as `give_up()` says so)."""
    deadline = time.monotonic() + wait
    while True:
        fd = try_acquire(path)
        if fd is not None:
            return fd
        if time.monotonic() > deadline or give_up():
            return None
        time.sleep(RETRY_EVERY)


def release(path: Path, fd: int) -> None:
    """Remove the file, then let its lock go (the order makes a waiter that opened the
    removed file try again on a new one)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def sweep(path: Path) -> bool:
    """Remove a lock nobody holds (a runner killed before it could): True if removed."""
    try:
        fd = try_acquire(path) if path.exists() else None
    except OSError:
        return False
    if fd is None:
        return False
    release(path, fd)
    return True
