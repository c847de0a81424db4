"""Unpack a job's shipped working directory (`corral run -w DIR`) into its private
work dir, refusing anything that could land outside it or be more than plain files:
no absolute paths, no `..`, no hard links, no device files or fifos, no symlink that
points out of the tree; symlinks are made last, so nothing is ever written through
one; sizes are bounded."""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path

from corral.agent.sandbox.jobuser import give_tree

MAX_BYTES = 4 * 2**30
MAX_MEMBERS = 200_000
CHUNK = 1024 * 1024


class UnsafeArchive(Exception):
    pass


def check_member(m: tarfile.TarInfo) -> str:
    """The member's safe relative name; raises UnsafeArchive saying why not."""
    name = m.name
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if not name or name == ".":
        raise UnsafeArchive(f"{m.name!r}: an empty name")
    if name.startswith("/"):
        raise UnsafeArchive(f"{m.name!r}: an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchive(f"{m.name!r}: a path with '..' or empty parts")
    if m.issym():
        target = m.linkname
        if not target or target.startswith("/"):
            raise UnsafeArchive(f"{m.name!r}: a symlink to an absolute path")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"{m.name!r}: a symlink pointing out of the tree")
    elif m.islnk():
        raise UnsafeArchive(f"{m.name!r}: a hard link")
    elif not (m.isdir() or m.isreg()):
        raise UnsafeArchive(f"{m.name!r}: not a file, directory or symlink")
    return name


def extract(archive: Path, dest: Path, uid: int | None = None, gid: int | None = None) -> int:
    """Unpack `archive` (tar, gzip'd or not) into the empty directory `dest`, then
    give the tree to uid:gid. Returns the number of files."""
    links: list[tuple[str, str]] = []
    total = files = members = 0
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchive(f"not a readable archive: {exc}") from None
    with tar:
        try:
            for m in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise UnsafeArchive(f"more than {MAX_MEMBERS} entries")
                name = check_member(m)
                target = dest / name
                if m.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                elif m.issym():
                    links.append((name, m.linkname))
                else:
                    total += m.size
                    if total > MAX_BYTES:
                        raise UnsafeArchive(f"more than {MAX_BYTES} bytes unpacked")
                    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    _write_member(tar, m, target)
                    files += 1
        except (tarfile.TarError, EOFError) as exc:
            raise UnsafeArchive(f"a damaged archive: {exc}") from None
        except (FileExistsError, NotADirectoryError) as exc:
            raise UnsafeArchive(f"{exc.filename}: appears twice in the archive") from None
    for name, target_name in links:
        (dest / name).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            os.symlink(target_name, dest / name)
        except FileExistsError:
            raise UnsafeArchive(f"{name!r}: appears twice in the archive") from None
    if uid is not None and gid is not None:
        give_tree(dest, uid, gid)
    return files


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path) -> None:
    src = tar.extractfile(m)
    if src is None:
        raise UnsafeArchive(f"{m.name!r}: no data")
    mode = 0o755 if m.mode & 0o111 else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out, src:
        while chunk := src.read(CHUNK):
            out.write(chunk)
