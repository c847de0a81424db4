"""An ended attempt's directory is removed whole: the files a runner leaves by name,
and anything else found there (a temporary file of a write cut short, a directory)
by a walk."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.agent.supervisor import ATTEMPT_FILES, _remove_attempt_dir


@pytest.mark.parametrize("extra", [None, ".runner.pid.123.tmp", "stray/deeper"])
def test_an_attempt_dir_is_removed_whole(tmp_path: Path, extra: str | None):
    d = tmp_path / "17-1"
    d.mkdir()
    for name in ATTEMPT_FILES[:3]:
        (d / name).write_text("{}")
    if extra:
        (d / extra).parent.mkdir(parents=True, exist_ok=True)
        (d / extra).write_text("x")
    _remove_attempt_dir(d)
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_attempt_dir_is_no_error(tmp_path: Path):
    _remove_attempt_dir(tmp_path / "gone")
