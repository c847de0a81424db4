"""corral: a control plane for batch and ML jobs on a fleet of machines."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.2.0"  # the one version source (pyproject.toml reads it)


_SDK = ("Client", "AsyncClient", "Job", "AsyncJob", "CorralError")


def __getattr__(name: str):
    """`from corral import Client` (and AsyncClient, Job, CorralError) loads the SDK
    on first use, so `import corral` stays light."""
    if name in _SDK:
        from corral.client import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


def default_data_dir() -> Path:
    """Where corral keeps its state unless told otherwise: $CORRAL_DATA_DIR or ~/.corral.
    Server, agent and client share this one rule."""
    return Path(os.environ.get("CORRAL_DATA_DIR") or Path.home() / ".corral").expanduser()
