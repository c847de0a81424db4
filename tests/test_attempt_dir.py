"""An ended attempt's directories are removed whole: the agent's (the files a runner
leaves, by name) and the job's (its empty subdirectories, by name); anything else
found there (a temporary file of a write cut short, what a job left, a subdirectory
it replaced by a link) by a walk that never follows a link."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.agent.dirs import remove_known_dir
from corral.agent.sandbox.attempt import SUBDIRS
from corral.agent.supervisor import ATTEMPT_FILES


@pytest.mark.parametrize("extra", [None, ".runner.pid.123.tmp", "stray/deeper"])
def test_an_attempt_dir_is_removed_whole(tmp_path: Path, extra: str | None):
    d = tmp_path / "17-1"
    d.mkdir()
    for name in ATTEMPT_FILES[:3]:
        (d / name).write_text("{}")
    if extra:
        (d / extra).parent.mkdir(parents=True, exist_ok=True)
        (d / extra).write_text("x")
    remove_known_dir(d, ATTEMPT_FILES)
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("left", [None, "outputs/model.bin", "work/cache/x", "tmp->victim"])
def test_a_job_dir_is_removed_whole_and_no_link_is_followed(tmp_path: Path, left: str | None):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    d = tmp_path / "jobs" / "17-1-abc"
    for sub in SUBDIRS:
        (d / sub).mkdir(parents=True)
    if left == "tmp->victim":  # the job replaced a subdirectory by a link
        (d / "tmp").rmdir()
        (d / "tmp").symlink_to(victim)
    elif left:
        (d / left).parent.mkdir(parents=True, exist_ok=True)
        (d / left).write_text("x")
    remove_known_dir(d, subdirs=SUBDIRS)
    assert not d.exists()
    assert (victim / "precious").read_text() == "keep"


def test_a_missing_dir_is_no_error(tmp_path: Path):
    remove_known_dir(tmp_path / "gone", ATTEMPT_FILES)
    remove_known_dir(tmp_path / "gone", subdirs=SUBDIRS)
