"""Process trees: find every process a job started, and kill them all."""

from __future__ import annotations

import os
import signal

import psutil


def same_process(pid: int, create_time: float | None) -> psutil.Process | None:
    """The live process `pid`, if it is the one started at `create_time` (no reuse)."""
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.01:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error, OSError):
            continue
    return out


def tree(roots: list[psutil.Process], pgid: int | None = None) -> list[psutil.Process]:
    """The roots, all their descendants, and every member of `pgid`."""
    found: dict[int, psutil.Process] = {}
    for r in roots:
        try:
            found[r.pid] = r
            for c in r.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            continue
    if pgid is not None and pgid > 1:
        for p in _group_members(pgid):
            found.setdefault(p.pid, p)
            try:
                for c in p.children(recursive=True):
                    found.setdefault(c.pid, c)
            except psutil.Error:
                continue
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_tree(roots: list[psutil.Process], pgid: int | None = None, grace: float = 5.0) -> None:
    """SIGTERM the whole tree, wait up to `grace`, SIGKILL what is left, and wait
    until every process is gone (children of ours are reaped)."""
    procs = tree(roots, pgid)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, survivors = psutil.wait_procs(procs, timeout=grace)
    # anything started meanwhile (a fork during the grace) is collected again
    alive = {p.pid: p for p in survivors}
    for p in tree(list(alive.values()), pgid):
        alive.setdefault(p.pid, p)
    for p in alive.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(list(alive.values()), timeout=5)
