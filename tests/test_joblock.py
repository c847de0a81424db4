"""A job's lock file on an agent: held by one runner at a time, removed by whoever
holds it, so the locks directory does not grow by a file per job ever run."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from corral.agent import joblock
from corral.agent.supervisor import Supervisor, Tracked


def test_a_held_lock_is_not_given_twice_and_its_release_removes_the_file(tmp_path: Path):
    path = tmp_path / "locks" / "job-1.lock"  # the directory is made on first use
    first = joblock.try_acquire(path)
    assert first is not None and path.exists()
    assert joblock.try_acquire(path) is None
    assert joblock.acquire(path, wait=0.3, give_up=lambda: False) is None
    joblock.release(path, first)
    assert not path.exists()
    again = joblock.try_acquire(path)
    assert again is not None
    joblock.release(path, again)


def test_a_waiter_gives_up_when_told(tmp_path: Path):
    path = tmp_path / "job-1.lock"
    held = joblock.try_acquire(path)
    calls = []

    def give_up() -> bool:
        calls.append(1)
        return True

    assert joblock.acquire(path, wait=60, give_up=give_up) is None
    assert calls == [1]
    joblock.release(path, held)


def test_a_file_removed_between_open_and_lock_is_not_taken_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Runner B opened the file; runner A, holding it, removed it and let go; B's flock
    then succeeds on a file no longer at the path while a third runner could lock the
    new one. B must lock the file at the path instead."""
    path = tmp_path / "job-1.lock"
    a = joblock.try_acquire(path)
    assert a is not None
    early = os.open(path, os.O_RDWR)  # B's open, before A lets go
    joblock.release(path, a)
    real_open = joblock._open
    opens = [early]

    def b_open(p: Path) -> int:
        return opens.pop() if opens else real_open(p)

    monkeypatch.setattr(joblock, "_open", b_open)
    b = joblock.try_acquire(path)
    assert b is not None
    assert opens == []  # B did open the removed file first
    assert os.fstat(b).st_nlink == 1  # what B holds is not a removed file
    assert os.fstat(b).st_ino == os.stat(path).st_ino
    # and it is the lock: nobody else gets it
    c = os.open(path, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(c)
    joblock.release(path, b)


def test_forgetting_an_attempt_sweeps_its_jobs_lock_unless_it_is_held(tmp_path: Path):
    """A runner killed before it could remove its job's lock leaves the file: the
    agent removes it when it forgets the attempt, unless a later attempt's runner of
    the same job holds it."""
    sup = Supervisor(tmp_path / "agent", ["http://127.0.0.1:9"], zygote=False)
    for job, held in ((7, False), (8, True)):
        d = sup.attempts_dir / f"{job}-1"
        d.mkdir()
        sup.tracked[(job, 1)] = Tracked(job, 1, "t", d)
        lock = sup._job_lock(job)
        fd = joblock.try_acquire(lock)
        assert fd is not None
        if held:
            sup.forget(job, 1)
            assert lock.exists()  # the holder removes it itself
            joblock.release(lock, fd)
        else:
            os.close(fd)  # the killed runner's lock: free, its file left
            sup.forget(job, 1)
            assert not lock.exists()
        assert not d.exists()
