"""Ship the user's code: `corral run -w DIR` packs DIR into one content-addressed
object and uploads it only if the server does not have it yet.

The archive is deterministic (entries sorted, mtime 0, owner root:root with no names,
modes normalised to 0644/0755, gzip without a timestamp), so an unchanged tree gives
the same sha256 and a second run uploads nothing. `.gitignore` files (in any
directory) and a `.corralignore` are honoured, with git's pattern rules (the
maintained `pathspec` library); `.git` itself is never shipped. A size cap keeps a
dataset from going up by mistake, naming the biggest files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from corral.client.render import human_size

DEFAULT_MAX_BYTES = 100 * 2**20
IGNORE_FILES = (".gitignore", ".corralignore")
NEVER = {".git"}


class WorkdirError(Exception):
    pass


@dataclass
class Entry:
    rel: str
    kind: str  # "dir" | "file" | "link"
    size: int = 0
    mode: int = 0
    link: str = ""


@dataclass
class Packed:
    path: Path
    sha256: str
    size: int
    files: int
    bytes_in: int
    skipped: list[str] = field(default_factory=list)


class _Ignores:
    """The ignore files seen on the way down, each applying to its own subtree; the
    deepest one with an opinion about a path decides (git's precedence)."""

    def __init__(self) -> None:
        self.specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []

    def load(self, directory: Path, rel_dir: str) -> None:
        for name in IGNORE_FILES:
            f = directory / name
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()
                self.specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        verdict = False
        for base, spec in self.specs:
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1 :] if base else rel
            result = spec.check_file(sub + "/" if is_dir else sub)
            if result.include is not None:
                verdict = result.include
        return verdict


def scan(root: Path) -> tuple[list[Entry], list[str]]:
    """What would be shipped from `root`, in archive order, and what is skipped."""
    root = Path(root)
    if not root.is_dir():
        raise WorkdirError(f"--workdir {root}: not a directory")
    ignores = _Ignores()
    entries: list[Entry] = []
    skipped: list[str] = []

    def walk(directory: Path, rel_dir: str) -> None:
        ignores.load(directory, rel_dir)
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise WorkdirError(f"cannot read {directory}: {exc.strerror}") from None
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = directory / name
            st = path.lstat()
            is_dir = stat.S_ISDIR(st.st_mode)
            if name in NEVER or ignores.ignored(rel, is_dir):
                continue
            if is_dir:
                entries.append(Entry(rel, "dir", mode=0o755))
                walk(path, rel)
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entries.append(Entry(rel, "file", st.st_size, mode))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                inside = os.path.normpath(os.path.join(os.path.dirname(rel), target))
                if os.path.isabs(target) or inside == ".." or inside.startswith("../"):
                    skipped.append(f"{rel} (a symlink pointing out of the directory)")
                else:
                    entries.append(Entry(rel, "link", link=target))
            else:
                skipped.append(f"{rel} (not a regular file)")

    walk(root, "")
    return entries, skipped


def pack(root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Packed:
    """Pack `root` into a temporary .tar.gz (the caller deletes `Packed.path`)."""
    root = Path(root)
    entries, skipped = scan(root)
    files = [e for e in entries if e.kind == "file"]
    total = sum(e.size for e in files)
    if total > max_bytes:
        biggest = sorted(files, key=lambda e: (-e.size, e.rel))[:5]
        raise WorkdirError(
            f"--workdir {root}: {human_size(total)} to ship, over the "
            f"{human_size(max_bytes)} limit (--workdir-limit); biggest: "
            + ", ".join(f"{e.rel} ({human_size(e.size)})" for e in biggest)
            + "; add what the job does not need to .corralignore"
        )
    fd, name = tempfile.mkstemp(prefix="corral-workdir-", suffix=".tar.gz")
    out = Path(name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            for e in entries:
                _add(tar, root, e)
        digest = hashlib.sha256()
        with open(out, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return Packed(out, digest.hexdigest(), out.stat().st_size, len(files), total, skipped)


def _add(tar: tarfile.TarFile, root: Path, e: Entry) -> None:
    info = tarfile.TarInfo(e.rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = e.mode or 0o644
    if e.kind == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif e.kind == "link":
        info.type = tarfile.SYMTYPE
        info.linkname = e.link
        info.mode = 0o777
        tar.addfile(info)
    else:
        info.size = e.size
        with open(root / e.rel, "rb") as f:
            tar.addfile(info, f)


def ship(client, root: Path, max_bytes: int, on_note: Callable[[str], None]) -> str:
    """Pack `root` and make sure the server has it; returns its object id."""
    from corral.client.sdk import CorralError

    packed = pack(root, max_bytes)
    try:
        for s in packed.skipped:
            on_note(f"workdir: skipped {s}")
        try:
            obj = client.object(packed.sha256)
            if obj.state == "live":
                on_note(
                    f"workdir {root}: {packed.files} files, {human_size(packed.size)} packed, "
                    f"already on the server (0 bytes uploaded)"
                )
                return packed.sha256
        except CorralError as exc:
            if exc.status != 404:
                raise
        client.put(packed.path, name=f"workdir-{Path(root).resolve().name}.tar.gz", wait=0)
        on_note(
            f"workdir {root}: {packed.files} files, {human_size(packed.size)} packed, "
            f"{human_size(packed.size)} uploaded"
        )
        return packed.sha256
    finally:
        packed.path.unlink(missing_ok=True)
