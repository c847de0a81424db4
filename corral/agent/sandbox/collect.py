"""Trusted output collection: what a job left in its output dir, read without ever
following a link the job planted.

The output dir is opened with O_NOFOLLOW|O_DIRECTORY relative to the attempt's job
directory (which the job cannot replace), and walked with openat: a top-level
symlink, a symlinked subdirectory, or anything that is not a regular file owned by the
job is skipped with a note. Files are copied into the store (or renamed, when nothing
of the attempt can still be running and fstat shows a regular file with one link on
the store's filesystem), never chmod-ed or chown-ed by path.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from corral.agent.objects import ObjectStore
from corral.domain.sandbox import text_problem

MAX_DEPTH = 64
MAX_FILES = 100_000
MAX_NOTED = 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Collected:
    outputs: list[dict] = field(default_factory=list)  # {path, sha256, size}
    skipped: list[str] = field(default_factory=list)  # "x/y is a symlink"
    notes: list[str] = field(default_factory=list)

    def note_skipped(self) -> None:
        if not self.skipped:
            return
        n = len(self.skipped)
        shown = "; ".join(self.skipped[:MAX_NOTED])
        more = f"; and {n - MAX_NOTED} more" if n > MAX_NOTED else ""
        self.notes.append(f"skipped {n} output{'s' if n != 1 else ''}: {shown}{more}")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def collect_outputs(
    job_dir: Path,
    store: ObjectStore,
    owner_uid: int,
    may_rename: bool = False,
    name: str = "outputs",
) -> Collected:
    """Every regular file the job (uid `owner_uid`) left under `job_dir/name` becomes
    an object in `store`. Raises OSError only for the store's own failures (a full
    disk); whatever the job did to its own directory is a note."""
    result = Collected()
    top = os.open(job_dir, DIR_FLAGS)
    try:
        try:
            out = os.open(name, DIR_FLAGS, dir_fd=top)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                st = os.stat(name, dir_fd=top, follow_symlinks=False)
                result.notes.append(f"skipped the output dir: it is {_kind(st.st_mode)}")
            elif exc.errno == errno.ENOENT:
                result.notes.append("the output dir was removed: no outputs")
            else:
                result.notes.append(f"cannot read the output dir: {exc.strerror}")
            return result
        try:
            st = os.fstat(out)
            if st.st_uid != owner_uid and st.st_uid != os.getuid():
                result.notes.append("skipped the output dir: not owned by the job")
                return result
            _walk(out, "", 0, store, owner_uid, may_rename, result)
        finally:
            os.close(out)
    finally:
        os.close(top)
    result.note_skipped()
    return result


def _walk(
    dir_fd: int,
    prefix: str,
    depth: int,
    store: ObjectStore,
    owner: int,
    may_rename: bool,
    result: Collected,
) -> None:
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        rel = prefix + name
        if text_problem(rel):
            result.skipped.append(f"{rel!r} has a name that is not UTF-8")
            continue
        if len(result.outputs) >= MAX_FILES:
            result.skipped.append(f"{rel}: more than {MAX_FILES} outputs")
            return
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if depth >= MAX_DEPTH:
                result.skipped.append(f"{rel} is nested too deep")
                continue
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError:  # replaced since the stat: by a link, or gone
                result.skipped.append(f"{rel} changed while it was read")
                continue
            try:
                if os.fstat(sub).st_uid != owner:
                    result.skipped.append(f"{rel} is not owned by the job")
                    continue
                _walk(sub, rel + "/", depth + 1, store, owner, may_rename, result)
            finally:
                os.close(sub)
            continue
        if not stat.S_ISREG(st.st_mode):
            result.skipped.append(f"{rel} is {_kind(st.st_mode)}")
            continue
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            kind = "a symlink" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
            result.skipped.append(f"{rel} is {kind}")
            continue
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                result.skipped.append(f"{rel} is {_kind(fst.st_mode)}")
                continue
            if fst.st_uid != owner:
                result.skipped.append(f"{rel} is not owned by the job")
                continue
            sha, size = store.add_from_fd(fd, (dir_fd, name) if may_rename else None)
        finally:
            os.close(fd)
        result.outputs.append({"path": rel, "sha256": sha, "size": size})
