"""Which certificates the agent and its runners trust for https: the system's, or the
CA in CORRAL_CA (`corral agent --ca FILE` sets it, so runners inherit it). Standard
library only: the runner imports this and must start fast."""

from __future__ import annotations

import functools
import os
import ssl

CA_ENV = "CORRAL_CA"


@functools.cache
def _context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # the system's CAs (public artifact URLs) ...
    if cafile:
        ctx.load_verify_locations(cafile=cafile)  # ... and the private one, if given
    return ctx


def context() -> ssl.SSLContext:
    """The client context for https to the servers (and anything they point at)."""
    return _context(os.environ.get(CA_ENV) or None)
