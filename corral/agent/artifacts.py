"""Artifacts on the agent: a content-addressed cache and an atomic installer.

Cache (DATA_DIR/cache, never beside installed components): files named by their
sha256, plus the ETag each URL last answered with and the sha256 of that body. If
the sha256 an order wants is cached, no request is made at all; otherwise the GET
carries If-None-Match with the URL's ETag when that names other bytes, so a URL that
still serves what was already fetched (or rejected) costs a 304 and no body. A download streams
to a temp file and is kept only if its size and sha256 match: an HTTP error page, a
short body or wrong bytes never enter the cache, let alone get installed. The
newest `keep` artifacts stay cached.

Install (DATA_DIR/components/NAME/SHA256/NAME): copied from the cache to a temp
file, made executable, renamed into place, then the marker current.json (which
records the sha256) is replaced atomically. A component on disk is the old one or
the complete, verified new one, never anything in between. Sizes are never used to
decide that two files are the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.agent.identity import write_json_atomic

log = logging.getLogger("corral.agent.artifacts")
CHUNK = 1024 * 1024


class InstallError(Exception):
    """The artifact could not be fetched or verified; nothing was installed."""


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    sha256: str
    path: Path


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    url: str
    sha256: str
    size: int | None = None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path, keep: int = 5):
        self.root = root
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._etags_path = root / "etags.json"
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def _etags(self) -> dict:
        try:
            return json.loads(self._etags_path.read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, url: str, etag: str | None, sha256: str) -> None:
        with self._lock:
            etags = self._etags()
            if etag:
                etags[url] = {"etag": etag, "sha256": sha256}
            else:
                etags.pop(url, None)
            write_json_atomic(self._etags_path, etags, mode=0o644, durable=False)

    def fetch(self, art: Artifact, client: httpx.Client, headers: dict | None = None) -> Path:
        """The cached file with `art.sha256`, downloading it if it is not cached."""
        target = self.path(art.sha256)
        if target.is_file():
            os.utime(target)  # most recently used
            return target
        headers = dict(headers or {})
        known = self._etags().get(art.url)
        if known and known["sha256"] != art.sha256:
            # a 304 then means "still the bytes you rejected or already have": no body
            headers["If-None-Match"] = known["etag"]
        tmp = self.root / f".partial-{secrets.token_hex(6)}"
        try:
            with client.stream("GET", art.url, headers=headers) as resp:
                if resp.status_code == 304 and known:
                    raise InstallError(
                        f"{art.url} is unchanged since it was last downloaded (sha256 "
                        f"{known['sha256'][:12]}…), but {art.name} {art.version} should have "
                        f"sha256 {art.sha256[:12]}…; not downloading it again"
                    )
                if not 200 <= resp.status_code < 300:
                    raise InstallError(
                        f"{art.url} answered HTTP {resp.status_code}; nothing installed"
                    )
                digest, size = hashlib.sha256(), 0
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes(CHUNK):
                        size += len(chunk)
                        if art.size is not None and size > art.size:
                            raise InstallError(
                                f"{art.url} sent more than the expected {art.size} bytes"
                            )
                        digest.update(chunk)
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                etag = resp.headers.get("etag")
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise InstallError(
                f"download of {art.url} failed: {exc.__class__.__name__}: {exc}"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        got = digest.hexdigest()
        if art.size is not None and size != art.size:
            tmp.unlink(missing_ok=True)
            raise InstallError(f"{art.url}: short body, {size} of {art.size} bytes")
        # a complete body: its ETag names these bytes, wanted or not, so an unchanged
        # URL is never downloaded twice
        self._remember(art.url, etag, got)
        if got != art.sha256:
            tmp.unlink(missing_ok=True)
            raise InstallError(
                f"{art.url}: sha256 {got[:12]}… does not match the expected "
                f"{art.sha256[:12]}…; not installed"
            )
        os.replace(tmp, target)
        self.prune()
        return target

    def prune(self) -> None:
        files = sorted(
            (
                p
                for p in self.root.iterdir()
                if p.is_file() and len(p.name) == 64 and not p.name.startswith(".")
            ),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in files[self.keep :]:
            old.unlink(missing_ok=True)


class Installer:
    """Keeps DATA_DIR/components/NAME at the ordered version."""

    def __init__(self, data_dir: Path, cache: ArtifactCache, keep_versions: int = 2):
        self.root = data_dir / "components"
        self.cache = cache
        self.keep_versions = keep_versions
        self.root.mkdir(parents=True, exist_ok=True)

    def installed(self, name: str) -> Installed | None:
        marker = self.root / name / "current.json"
        try:
            data = json.loads(marker.read_text())
            path = Path(data["path"])
            if not path.is_file():
                return None
            return Installed(name, data["version"], data["sha256"], path)
        except (OSError, ValueError, KeyError):
            return None

    def all_installed(self) -> list[Installed]:
        out = []
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            inst = self.installed(d.name)
            if inst is not None:
                out.append(inst)
        return out

    def install(
        self,
        art: Artifact,
        client: httpx.Client,
        headers: dict | None = None,
        verify: Callable[[Path], None] | None = None,
    ) -> Installed:
        """Install `art` unless its sha256 is already installed. `verify(path)` may
        reject the new file (raise InstallError) before it becomes current."""
        current = self.installed(art.name)
        if current is not None and current.sha256 == art.sha256:
            return current  # already there: no request at all
        src = self.cache.fetch(art, client, headers)
        dest_dir = self.root / art.name / art.sha256
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / art.name
        if not (dest.is_file() and sha256_of(dest) == art.sha256):
            tmp = dest_dir / f".{art.name}.{secrets.token_hex(4)}.tmp"
            try:
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                if sha256_of(tmp) != art.sha256:  # the cache file changed under us
                    raise InstallError(f"cached {art.sha256[:12]}… is corrupt; removed")
                os.chmod(tmp, 0o755)  # noqa: S103 - an installed component is an executable
                os.replace(tmp, dest)
            except InstallError:
                self.cache.path(art.sha256).unlink(missing_ok=True)
                raise
            finally:
                tmp.unlink(missing_ok=True)
        if verify is not None:
            verify(dest)
        write_json_atomic(
            self.root / art.name / "current.json",
            {
                "version": art.version,
                "sha256": art.sha256,
                "path": str(dest),
                "installed_at": time.time(),
                "previous": current.sha256 if current else None,
            },
            mode=0o644,
        )
        self._prune(art.name, keep={art.sha256, current.sha256 if current else ""})
        log.info("installed %s %s (sha256 %s)", art.name, art.version, art.sha256[:12])
        return Installed(art.name, art.version, art.sha256, dest)

    def _prune(self, name: str, keep: set[str]) -> None:
        dirs = sorted(
            (d for d in (self.root / name).iterdir() if d.is_dir() and len(d.name) == 64),
            key=lambda d: d.stat().st_mtime,
            reverse=True,
        )
        kept = 0
        for d in dirs:
            if d.name in keep or kept < self.keep_versions:
                kept += 1
                continue
            shutil.rmtree(d, ignore_errors=True)
