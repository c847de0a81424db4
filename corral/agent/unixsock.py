"""Addresses of the agent's unix sockets (the zygote's, the relay's) in its data dir."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PATH_MAX = 100  # sun_path is 108 bytes; past this, reach the socket through /proc/self/fd


@contextlib.contextmanager
def socket_path(data_dir: Path, name: str) -> Iterator[str]:
    """The address of `name` in `data_dir`; a long data dir is reached through an open
    fd of it (valid while the context is open: bind or connect inside it)."""
    path = str(data_dir / name)
    if len(os.fsencode(path)) <= PATH_MAX:
        yield path
        return
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)
