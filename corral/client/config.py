"""Where the server is and which token to use.

Server: --server (the command's, then the app's: `corral --server URL jobs`), then
CORRAL_SERVER, then the current context, then the file `corral up`
/ `corral server` writes in the data dir, then http://127.0.0.1:8470. Several URLs
(comma-separated) are tried in turn when one cannot be reached.

Token: --token (the command's, then the app's), then CORRAL_TOKEN, then the current
context's token file, then the admin token file in the data dir. The client remembers
which one it used, so an error about a bad token can say where that token came from.

Contexts live in $XDG_CONFIG_HOME/corral/config.json (default ~/.config/corral), mode
0600. A context names server URL(s) and a token *file*; the token itself is not copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from corral import default_data_dir

DEFAULT_SERVER = "http://127.0.0.1:8470"


@dataclass(frozen=True)
class ClientConfig:
    servers: list[str]
    token: str | None
    token_source: str
    ca: str | None = None  # a CA (PEM) trusted for https besides the system's

    @property
    def server(self) -> str:
        return self.servers[0]


class ConfigError(Exception):
    pass


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "corral"


def config_path() -> Path:
    return config_dir() / "config.json"


def split_servers(text: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {u!r} must start with http:// or https://")
    return urls


def load() -> dict:
    try:
        data = json.loads(config_path().read_text())
    except FileNotFoundError:
        return {"current": None, "contexts": {}}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_path()}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("contexts", {}), dict):
        raise ConfigError(f"{config_path()}: not a corral config (expected contexts)")
    data.setdefault("contexts", {})
    data.setdefault("current", None)
    return data


def save(data: dict) -> Path:
    """Write the config atomically, readable by its owner only (0600)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def current_context() -> tuple[str, dict] | None:
    data = load()
    name = data.get("current")
    if not name:
        return None
    ctx = data["contexts"].get(name)
    if ctx is None:
        raise ConfigError(f"the current context {name!r} is not defined in {config_path()}")
    return name, ctx


# `corral --server URL --token T COMMAND`: the app's own options, used by the command's
# client when the command is given none of its own
app_options: dict[str, str] = {}


def resolve(
    server: str | None = None, token: str | None = None, ca: str | None = None
) -> ClientConfig:
    server = server or app_options.get("server")
    token = token or app_options.get("token")
    d = default_data_dir()
    ca = ca or os.environ.get("CORRAL_CA") or None
    ctx = None
    if not server or not token:
        ctx = current_context()
    servers: list[str] = []
    if server:
        servers = split_servers(server)
    elif os.environ.get("CORRAL_SERVER"):
        servers = split_servers(os.environ["CORRAL_SERVER"])
    elif ctx:
        servers = list(ctx[1].get("servers") or [])
    if not servers:
        try:
            servers = [json.loads((d / "server.json").read_text())["url"].rstrip("/")]
        except (OSError, ValueError, KeyError):
            servers = [DEFAULT_SERVER]
    source = "--token"
    if not token and os.environ.get("CORRAL_TOKEN"):
        token, source = os.environ["CORRAL_TOKEN"], "the CORRAL_TOKEN environment variable"
    if not token and ctx and ctx[1].get("token_file"):
        path = Path(ctx[1]["token_file"])
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"context {ctx[0]}: cannot read its token file {path} ({exc.strerror})"
            ) from None
        source = f"the token file {path} of context {ctx[0]}"
    if not token:
        path = d / "admin.token"
        try:
            token, source = path.read_text().strip(), f"{path} (written by corral up/server)"
        except OSError:
            token, source = None, "nowhere (no --token, CORRAL_TOKEN, context or token file)"
    return ClientConfig(servers, token, source, ca)
