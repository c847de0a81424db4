"""The unprivileged user a root agent runs jobs as (`--job-user`, default corral-job),
created as a system user with no home, no shell and no password if it is missing."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class JobUserError(Exception):
    pass


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int


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
