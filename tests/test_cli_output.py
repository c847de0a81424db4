"""What the CLI prints: user and job text is never read as Rich markup and never carries
terminal control sequences to the operator; tables, plain text and JSON/YAML output.

The CLI runs as a real process (`python -m corral`) against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from corral.testing import Cluster

pytestmark = pytest.mark.e2e

NASTY_NAME = "x[i] [bold]loud[/bold] [/foo]"
NASTY_COMMAND = ["echo", "print(x[i])", "[/foo]", "[bold]b", "\x1b[31mred", "bell\x07"]
SGR = re.compile(r"\x1b\[[0-9;]*m")


def cli(server, *args: str, tty: bool, columns: int = 200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS=str(columns), CORRAL_SERVER=server.url, CORRAL_TOKEN=server.admin_token)
    if tty:  # Rich treats FORCE_COLOR as "stdout is a terminal"
        env["FORCE_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def server(tmp_path):
    with Cluster(tmp_path / "cluster") as c:
        yield c.server()


def _submit(server) -> int:
    from corral.client.sdk import Client

    with Client(server=server.url, token=server.admin_token) as c:
        return c.submit(NASTY_COMMAND, name=NASTY_NAME).id


def _assert_neutralised(out: str) -> None:
    # the job's own escape sequence and bell never reach the terminal
    assert "\x1b[31mred" not in out
    assert "\x07" not in out
    text = SGR.sub("", out)
    # markup-like text is shown as written, not interpreted (nor dropped)
    for literal in ("print(x[i])", "[/foo]", "[bold]b", "x[i]", "[bold]loud[/bold]"):
        assert literal in text, (literal, text)
    assert "\\x1b[31mred" in text  # shown, visibly escaped


def test_job_text_is_never_markup_nor_terminal_control(server):
    job_id = _submit(server)
    for args in (["jobs"], ["job", str(job_id)], ["jobs", "-o", "wide"]):
        for tty in (True, False):
            r = cli(server, *args, tty=tty)
            assert r.returncode == 0, (args, tty, r.stdout, r.stderr)
            _assert_neutralised(r.stdout)

    # JSON carries the text exactly as submitted (it is data, escaped by JSON itself)
    r = cli(server, "job", str(job_id), "-o", "json", tty=False)
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["command"] == NASTY_COMMAND
    assert view["name"] == NASTY_NAME
    assert "\x1b" not in r.stdout  # json.dumps escapes it as \u001b
