"""What the CLI prints: user and job text is never read as Rich markup and never carries
terminal control sequences to the operator; tables, plain text and JSON/YAML output.

The CLI runs as a real process (`python -m corral`) against a real server."""

from __future__ import annotations

import json
import os
import re
import shlex
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

    # a queued job says why it waits (the dispatcher's reason, once it has looked)
    from corral.client.sdk import Client
    from corral.testing import wait_for

    with Client(server=server.url, token=server.admin_token) as c:
        wait_for(lambda: c.job(job_id).reason, 30, "a reason for the queued job")
    r = cli(server, "job", str(job_id), tty=False)
    assert "waiting   no running instance" in r.stdout, r.stdout

    # JSON carries the text exactly as submitted (it is data, escaped by JSON itself)
    r = cli(server, "job", str(job_id), "-o", "json", tty=False)
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["command"] == NASTY_COMMAND
    assert view["name"] == NASTY_NAME
    assert "\x1b" not in r.stdout  # json.dumps escapes it as \u001b


def test_tables_fit_the_terminal_pipes_get_tabs_and_yaml_is_data(server):
    from corral.client.sdk import Client

    long_cmd = ["sh", "-c", "echo" + " a-long-command-line" * 8]
    with Client(server=server.url, token=server.admin_token) as c:
        ids = [c.submit(long_cmd, name=f"named-{i}").id for i in range(3)]

    # a terminal of 80 columns: no line is longer, ids and the NAME column are whole
    r = cli(server, "jobs", tty=True, columns=80)
    assert r.returncode == 0, r.stderr
    lines = SGR.sub("", r.stdout).splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert all(len(line) <= 80 for line in lines), lines
    for i, job_id in enumerate(ids):
        row = next(line for line in lines if line.split()[0] == str(job_id))
        assert f"named-{i}" in row
        assert "…" in row  # the long command is cut to fit, with a mark
    # a very narrow terminal drops whole columns rather than breaking an id
    r = cli(server, "jobs", tty=True, columns=30)
    lines = SGR.sub("", r.stdout).splitlines()
    assert all(len(line) <= 30 for line in lines), lines
    assert {line.split()[0] for line in lines[1:]} >= {str(i) for i in ids}

    # wide: every column, nothing cut
    r = cli(server, "jobs", "-o", "wide", tty=True, columns=80)
    text = SGR.sub("", r.stdout)
    assert "REASON" in text and shlex.join(long_cmd) in text

    # piped: tab-separated, a header line, the command whole
    r = cli(server, "jobs", tty=False)
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows[0][:4] == ["ID", "NAME", "STATE", "COMMAND"]
    assert "\x1b" not in r.stdout
    by_id = {row[0]: row for row in rows[1:]}
    assert by_id[str(ids[0])][1] == "named-0"
    assert by_id[str(ids[0])][3] == shlex.join(long_cmd)

    # yaml and json carry the same data; timestamps are ISO-8601 UTC
    import yaml

    as_yaml = yaml.safe_load(cli(server, "jobs", "-o", "yaml", tty=False).stdout)
    as_json = json.loads(cli(server, "jobs", "--json", tty=False).stdout)
    assert as_yaml == as_json
    assert {j["name"] for j in as_json} >= {"named-0", "named-1", "named-2"}
    iso_utc = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
    assert all(iso_utc.match(j["created_at"]) for j in as_json), as_json[0]["created_at"]
    assert all(j["started_at"] is None for j in as_json)  # queued: not started

    # --watch redraws until stopped (here: after 2 rounds)
    r = cli(server, "jobs", "--watch", "--interval", "0.2", "--count", "2", tty=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ID\tNAME\tSTATE") == 2
    for command, header in (("instances", "NAME\tID\tFLEET"), ("rollouts", "ID\tCOMPONENT")):
        r = cli(server, command, "--watch", "--interval", "0.2", "--count", "2", tty=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count(header) == 2, r.stdout

    # an unknown format is a usage error naming the choices
    r = cli(server, "jobs", "-o", "xml", tty=False)
    assert r.returncode == 2
    assert "table, wide, json, yaml" in r.stderr


def test_version_names_the_cli_and_the_server_build(server):
    import corral

    r = cli(server, "--version", tty=False)
    assert r.returncode == 0, r.stderr
    assert f"corral {corral.__version__} (CLI)" in r.stdout
    assert f"server {corral.__version__}" in r.stdout
