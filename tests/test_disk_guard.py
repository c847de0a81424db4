"""The disk guard's decision (pure) and its measure of what an attempt holds."""

from __future__ import annotations

import os
from pathlib import Path

from corral.agent.diskguard import DiskGuard
from corral.domain.disk import MiB, choose_eviction, disk_reserve_bytes, eviction_reason


def test_the_reserve_is_five_percent_at_most_two_gib_unless_configured():
    assert disk_reserve_bytes(10 * 1024 * MiB, None) == 512 * MiB
    assert disk_reserve_bytes(1024 * 1024 * MiB, None) == 2048 * MiB
    assert disk_reserve_bytes(10 * 1024 * MiB, 100) == 100 * MiB
    assert disk_reserve_bytes(10 * 1024 * MiB, 0) == 0  # off


def test_the_attempt_holding_the_most_goes_once_free_space_is_below_the_reserve():
    usage = {"a": 3 * MiB, "b": 20 * MiB, "c": 0}
    assert choose_eviction(9 * MiB, 8 * MiB, usage) is None  # enough free
    assert choose_eviction(7 * MiB, 8 * MiB, usage) == "b"
    assert choose_eviction(7 * MiB, 8 * MiB, {"c": 0}) is None  # nobody holds anything
    # the disk filled by something else: a job holding less than a quarter of the
    # reserve is not the cause, and killing it would give nothing back
    assert choose_eviction(MiB, 8 * MiB, {"a": 2 * MiB - 1}) is None
    assert choose_eviction(MiB, 8 * MiB, {"a": 2 * MiB}) == "a"
    assert choose_eviction(7 * MiB, 8 * MiB, {}) is None
    assert choose_eviction(0, 0, usage) is None  # reserve 0: the guard is off
    reason = eviction_reason(20 * MiB, 7 * MiB, 8 * MiB)
    assert reason == (
        "killed: the disk was nearly full (7 MiB free, 8 MiB kept free); this attempt "
        "held 20 MiB, the most of any on its instance"
    )


def test_what_an_attempt_holds_is_its_directory_without_following_links(tmp_path: Path):
    job = tmp_path / "job"
    (job / "work" / "deep").mkdir(parents=True)
    (job / "work" / "deep" / "data").write_bytes(os.urandom(3 * MiB))
    outside = tmp_path / "outside"
    outside.write_bytes(os.urandom(5 * MiB))
    (job / "work" / "link").symlink_to(outside)
    device = os.stat(tmp_path).st_dev
    held = DiskGuard.held(str(job), device)
    assert 3 * MiB <= held < 4 * MiB  # the 5 MiB the link points at are not the job's
    assert DiskGuard.held(str(tmp_path / "gone"), device) == 0


def test_the_guard_asks_for_the_attempts_only_when_space_is_low(tmp_path: Path):
    asked: list[bool] = []

    def attempts() -> dict[str, str]:
        asked.append(True)
        return {"a": str(tmp_path)}

    assert DiskGuard(str(tmp_path), 0).check(attempts) is None
    assert asked == []
    st = os.statvfs(tmp_path)
    everything = st.f_blocks * st.f_frsize // MiB + 1  # more than is free, always
    # low: the attempts are measured (this one holds too little to be the cause)
    assert DiskGuard(str(tmp_path), everything).check(attempts) is None
    assert asked == [True]
