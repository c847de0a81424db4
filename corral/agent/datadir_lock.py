"""One agent process per data dir: an exclusive `flock` on DATA_DIR/agent.lock, held for
the life of the process. A second agent started on a data dir in use would otherwise
register again, supersede the live incarnation and act on its jobs and files.

The lock belongs to the open file, which is close-on-exec: a self-update re-executing
in place (same PID) takes it again at start, and the runners the agent starts do not
hold it. A process that dies releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "agent.lock"


class DataDirInUse(Exception):
    pass


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(path.read_text().split()[0]))
    return "unknown"


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's lock (or raise DataDirInUse naming the PID that holds it);
    return the descriptor, which must stay open while the agent runs."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(
            f"data dir {data_dir} is in use by another agent (pid {_holder(path)}); "
            "stop that agent first, or give this one its own --data-dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
