"""The agent's small JSON files (identity, attempt bookkeeping) are replaced whole:
a reader sees the old file or the new one, the file is the owner's only, and a write
that fails leaves neither a half file nor a stray temporary one."""

from __future__ import annotations

import json
import os
import stat

import pytest

from corral.agent.identity import write_json_atomic


def test_a_json_file_is_written_whole_private_and_replaced(tmp_path):
    path = tmp_path / "new" / "dir" / "runner.pid"  # its directory is made when missing
    write_json_atomic(path, {"pid": 1, "create_time": 2.5}, durable=False)
    assert json.loads(path.read_text()) == {"pid": 1, "create_time": 2.5}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_json_atomic(path, {"pid": 3})
    assert json.loads(path.read_text()) == {"pid": 3}
    assert os.listdir(path.parent) == ["runner.pid"]  # no temporary file left


def test_a_value_that_is_not_json_leaves_the_old_file_alone(tmp_path):
    path = tmp_path / "done.json"
    write_json_atomic(path, {"state": "finished"})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"state": object()})
    assert json.loads(path.read_text()) == {"state": "finished"}
    assert os.listdir(tmp_path) == ["done.json"]
