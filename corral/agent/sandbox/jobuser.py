"""The unprivileged users a root agent runs jobs as, created as system users with no
home, no shell and no password if they are missing: `--job-user` (default corral-job)
and, for each attempt, one of its numbered twins (`corral-job-0`, `corral-job-1`, ...)
that no other live attempt on the host has. Jobs of one user could read each other's
environment (their secrets) in /proc, signal each other (`kill -9 -1` ended every job
on the machine) and open each other's private files in /tmp and /dev/shm."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.agent.libc import libc
from corral.agent.sandbox.cgroups import v2_populated

# Host-wide (every root agent's runners claim their users here), root-only.
USER_SLOTS_DIR = "/run/corral-job-users"
MAX_USER_SLOTS = 4096
# Where every user may write (sticky, world-writable): what a job user leaves there (and
# in the sticky, world-writable directories inside) is removed before its user is given
# to another attempt
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")  # noqa: S108
SHARED_DEPTH = 3  # world-writable directories inside those are searched this deep


class JobUserError(Exception):
    pass


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int
    slot: int | None = None  # N of a claimed `{base}-N` (claim_job_user)


def ensure_job_user(name: str, create: bool = True) -> JobUser:
    for attempt in range(20):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            pw = None
        if pw is not None:
            if pw.pw_uid == 0 or pw.pw_gid == 0:
                raise JobUserError(f"job user {name!r} has uid or gid 0; jobs never run as root")
            return JobUser(name, pw.pw_uid, pw.pw_gid)
        if not create:
            raise JobUserError(f"job user {name!r} does not exist")
        useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
        if useradd is None:
            raise JobUserError(f"job user {name!r} does not exist and useradd is not available")
        r = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "corral jobs",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        # 9: another agent created it meanwhile; 10: /etc/passwd is locked, try again
        if r.returncode not in (0, 9, 10):
            raise JobUserError(f"cannot create job user {name!r}: {r.stderr.strip()}")
        if r.returncode == 10:
            time.sleep(0.1 * (attempt + 1))
    raise JobUserError(f"cannot create job user {name!r}: /etc/passwd stays locked")


def give_tree(root: Path, uid: int, gid: int) -> None:
    """chown a tree this process just made to the job user (no link is followed)."""
    os.lchown(root, uid, gid)
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            os.lchown(os.path.join(d, n), uid, gid)


def claim_job_user(
    base: str, slots_dir: str = USER_SLOTS_DIR, group: str = ""
) -> tuple[JobUser, int]:
    """A job user no other live attempt on this host runs as: `{base}-{n}` for the
    lowest `n` whose lock file this process can lock (created if missing). Returns the
    user and the locked fd: the user is this caller's until `release_job_user(fd)`, or
    until the kernel closes the fd with a process that died. The fd is close-on-exec:
    the job never holds it.

    `group`: the attempt's cgroup (v2) directory, written into the lock file. A lock
    that is free but still names a group (its runner died before releasing it) is
    passed over while that group has processes: the agent kills a dead runner's
    attempt when it next reaps, and until then its processes still run as that user."""
    _root_only_dir(slots_dir)
    for n in range(MAX_USER_SLOTS):
        name = f"{base}-{n}"
        fd = os.open(
            os.path.join(slots_dir, f"{name}.lock"),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if left and v2_populated(left):
                raise BlockingIOError(f"{name}: its last attempt still has processes")
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            user = dataclasses.replace(ensure_job_user(name), slot=n)
            if left:  # its last attempt's runner died before it could clean up
                remove_files_of(user.uid)
            os.ftruncate(fd, 0)
            os.pwrite(fd, group.encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return user, fd
    raise JobUserError(f"all {MAX_USER_SLOTS} job users {base}-N are in use on this host")


def release_job_user(fd: int, group: str = "", uid: int | None = None) -> None:
    """The attempt that claimed this user is over. Once its group has no process left,
    what the user left where every user may write is removed (the next attempt given
    this user must not find it: a file of mode 0600 in /tmp would be its to read) and
    the lock file forgets the group (else the next claimers pass the user over, and the
    one that takes it at last cleans up)."""
    try:
        if not (group and v2_populated(group)):
            if uid is not None:
                remove_files_of(uid)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def remove_files_of(
    uid: int, roots: tuple[str, ...] = SHARED_WRITABLE, depth: int = SHARED_DEPTH
) -> int:
    """Remove every file, directory (with what is in it) and link owned by `uid` in
    `roots` and in the sticky, world-writable directories below them (`depth` levels),
    never following a link, and its System V IPC objects. Call only when nothing runs as
    `uid`. Returns how many were removed."""
    if uid == 0:
        raise ValueError("never the files of root")
    removed = 0
    for path, st in list(owned_entries(uid, roots, depth)):
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed + remove_ipc_of(uid)


def owned_entries(
    uid: int, roots: tuple[str, ...] = SHARED_WRITABLE, depth: int = SHARED_DEPTH
) -> Iterator[tuple[str, os.stat_result]]:
    """Each file, directory or link owned by `uid` in `roots` and in the sticky,
    world-writable directories below them (`depth` levels), not looking inside what it
    owns, never following a link."""
    for root in roots:
        yield from _owned_in(root, uid, depth)


def _owned_in(directory: str, uid: int, depth: int) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid == uid:
            yield entry.path, st
        elif stat.S_ISDIR(st.st_mode) and _shared_scratch(st.st_mode) and depth > 1:
            yield from _owned_in(entry.path, uid, depth - 1)


def _shared_scratch(mode: int) -> bool:
    """A directory every user may write and none may remove another's files from
    (sticky, like /tmp itself: /tmp/.X11-unix). A world-writable directory without the
    sticky bit is a place someone shared on purpose (results go there): left alone."""
    return bool(mode & stat.S_IWOTH and mode & stat.S_ISVTX)


def disk_usage(path: str, device: int) -> int:
    """Bytes the tree at `path` takes on `device` (its blocks; no link followed, no
    other filesystem entered)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if st.st_dev != device:
        return 0
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    for d, dirs, files in os.walk(path):  # a link to a directory is never descended
        inside = []
        for name in dirs + files:
            try:
                child = os.lstat(os.path.join(d, name))
            except OSError:
                continue
            if child.st_dev != device:  # another filesystem mounted in the tree
                continue
            total += child.st_blocks * 512
            if stat.S_ISDIR(child.st_mode):
                inside.append(name)
        dirs[:] = inside
    return total


def remove_ipc_of(uid: int, proc: str = "/proc/sysvipc") -> int:
    """Remove the System V shared memory segments, message queues and semaphore sets
    that `uid` owns or made (they outlive their processes, as a file in /tmp does)."""
    ipc_rmid = 0
    removers = {
        "shm": lambda i: libc.shmctl(i, ipc_rmid, None),
        "msg": lambda i: libc.msgctl(i, ipc_rmid, None),
        "sem": lambda i: libc.semctl(i, 0, ipc_rmid),
    }
    removed = 0
    for kind, remove in removers.items():
        for ident in owned_ipc_ids(_read_or_empty(os.path.join(proc, kind)), uid):
            if remove(ident) == 0:
                removed += 1
    return removed


def owned_ipc_ids(table: str, uid: int) -> list[int]:
    """The ids (second column) of a /proc/sysvipc table's rows whose uid or cuid is
    `uid`."""
    lines = table.splitlines()
    if not lines:
        return []
    header = lines[0].split()
    cols = [header.index(c) for c in ("uid", "cuid") if c in header]
    ids = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) == len(header) and any(fields[c] == str(uid) for c in cols):
            ids.append(int(fields[1]))
    return ids


def _read_or_empty(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _root_only_dir(path: str) -> None:
    """`path` as a directory of this (root) process's own, mode 0700, never a link."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise JobUserError(f"{path} is not a directory of the agent's own")
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise JobUserError(f"cannot make {path} private: {exc}") from None
