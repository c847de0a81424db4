"""The C library, loaded once per process (a runner forked from the zygote inherits
it: loading it through ctypes cost each runner 0.2 ms per use)."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def errno_error(what: str) -> OSError:
    """The OSError of the last failed call, named `what`."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")
