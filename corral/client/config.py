"""Where the server is and which token to use: flags, then CORRAL_SERVER /
CORRAL_TOKEN, then the files `corral up` / `corral server` write in the data dir."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from corral import default_data_dir

DEFAULT_SERVER = "http://127.0.0.1:8470"


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str | None
    token_source: str
    ca: str | None = None  # a CA (PEM) trusted for https besides the system's


def resolve(
    server: str | None = None, token: str | None = None, ca: str | None = None
) -> ClientConfig:
    d = default_data_dir()
    ca = ca or os.environ.get("CORRAL_CA") or None
    if not server:
        server = os.environ.get("CORRAL_SERVER")
    if not server:
        try:
            server = json.loads((d / "server.json").read_text())["url"]
        except (OSError, ValueError, KeyError):
            server = DEFAULT_SERVER
    source = "--token"
    if not token:
        token, source = os.environ.get("CORRAL_TOKEN"), "CORRAL_TOKEN"
    if not token:
        path = d / "admin.token"
        try:
            token, source = path.read_text().strip(), str(path)
        except OSError:
            token, source = None, "none"
    return ClientConfig(server.rstrip("/"), token, source, ca)
