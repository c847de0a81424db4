"""The client never loads the server stack: `corral --help`, the client commands and
`import corral` run without FastAPI, SQLAlchemy, Alembic, asyncpg or uvicorn; the
packaging keeps them in the `server` extra; the daemons say how to get them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_STACK = ("fastapi", "sqlalchemy", "alembic", "asyncpg", "uvicorn", "jinja2")

# runs `corral ARGS` in-process (as the entry point does), then reports which of the
# server modules got imported
PROBE = """
import json, sys
stack = json.loads(sys.argv[2])
sys.argv = ["corral", *json.loads(sys.argv[1])]
import corral.cli
code = 0
try:
    corral.cli.main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in stack)
print(json.dumps({"code": code, "loaded": heavy}), file=sys.stderr)
"""


def _probe(args: list[str], env: dict | None = None) -> dict:
    import os

    full = {**os.environ, "CORRAL_SERVER": "http://127.0.0.1:9", **(env or {})}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(SERVER_STACK)],
        capture_output=True,
        text=True,
        timeout=60,
        env=full,
        cwd=ROOT,
    )
    return json.loads(r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["jobs", "--help"],
        # a client command that reaches for a server (there is none on port 9)
        ["jobs"],
        # no server answers: the submit's retries wait 3.5 s before it gives up
        pytest.param(["run", "--detach", "--", "true"], marks=pytest.mark.slow),
        ["job", "1", "-o", "json"],
    ],
)
def test_client_commands_never_import_the_server_stack(args):
    result = _probe(args)
    assert result["loaded"] == [], f"corral {' '.join(args)} imported {result['loaded']}"


def test_import_corral_is_light():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, corral; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{SERVER_STACK!r} or m in ('pydantic', 'httpx', 'rich', 'typer')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_daemon_without_the_server_extra_says_how_to_install_it():
    # a Python that cannot import fastapi: the same environment with fastapi hidden
    hide = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'fastapi':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "sys.argv = ['corral', 'server', '--help']\n"
        "import corral.cli\n"
        "corral.cli.main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", hide], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "pip install 'corral[server]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_packaging_keeps_the_server_in_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(d) for d in project["dependencies"]}
    assert {"httpx", "typer", "rich", "pydantic"} <= base
    assert not base & {"fastapi", "uvicorn", "sqlalchemy", "alembic", "asyncpg"}
    server = {_name(d) for d in project["optional-dependencies"]["server"]}
    assert {"fastapi", "uvicorn", "sqlalchemy", "alembic", "asyncpg"} <= server
    # what CI installs (.[dev]) and the test extra still bring the server
    for extra in ("dev", "test"):
        deps = project["optional-dependencies"][extra]
        assert any(d.startswith("corral[") and "server" in d for d in deps) or any(
            d.startswith("corral[test") for d in deps
        ), extra


def _name(req: str) -> str:
    import re

    return re.split(r"[\[<>=~! ;]", req, maxsplit=1)[0].lower()


def test_every_wire_model_and_client_module_imports_without_the_server_stack():
    code = (
        "import sys, corral.api as a\n"
        "for n in a.__all__: getattr(a, n)\n"
        "import corral.client.workdir, corral.client.sdk, corral.client.data_cli\n"
        "import corral.client.context_cli, corral.client.components_cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_STACK!r}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# `corral run --detach` against a stand-in server that accepts the job: which modules the
# command imported and which wire models it built
RUN_PROBE = """
import json, sys
sys.argv = ["corral", *json.loads(sys.argv[1])]
import corral.cli
code = 0
try:
    corral.cli.main()
except SystemExit as exc:
    code = exc.code
loaded = sorted(name for name, m in sys.modules.items() if m is not None)
from pydantic import BaseModel

def below(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from below(sub)

wire = {m for m in below(BaseModel) if m.__module__.startswith("corral.api.")}
built = sorted({m.__name__ for m in wire if m.__pydantic_complete__} - {"Strict", "Wire"})
print(json.dumps({"code": code, "modules": loaded, "built": built}), file=sys.stderr)
"""

# what `corral run --detach` has no use for: httpx's own CLI (click, rich, pygments),
# the output formats and the other commands' modules, the wire models (the server checks
# the job it is sent; the client checks it too only when the server refuses it), pydantic
NOT_FOR_RUN = (
    "pydantic",
    "pydantic_core",
    "corral.api.common",
    "corral.api.jobs",
    "httpx._main",
    "click",
    "rich",
    "pygments",
    "yaml",
    "dotenv",
    "corral.client.components_cli",
    "corral.client.context_cli",
    "corral.client.data_cli",
    "corral.client.tokens_cli",
    "corral.client.workdir",
    "corral.api.agents",
    "corral.api.components",
    "corral.api.fleets",
    "corral.api.instances",
    "corral.api.objects",
    "corral.api.tokens",
)

JOB_VIEW = {
    "id": 7,
    "name": None,
    "state": "queued",
    "command": ["true"],
    "fleet": None,
    "cpus": 1.0,
    "memory_mb": 0,
    "max_attempts": 3,
    "attempt": 0,
    "instance_id": None,
    "exit_code": None,
    "reason": None,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
    "result_attempt": None,
}


@contextlib.contextmanager
def _stand_in(answer: Callable[[str, bytes], tuple[int, dict]]) -> Iterator[str]:
    """A stand-in for the API on loopback: every POST is answered by `answer(path,
    body)` -> (status, JSON reply)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            status, reply = answer(self.path, self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps(reply)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def accepting_server():
    """A stand-in for the API that accepts any job submit as job 7 (the import probe
    needs the whole submit path, reply included, not a real cluster)."""

    def answer(path: str, _body: bytes) -> tuple[int, dict]:
        if path == "/api/v1/jobs":
            return 200, JOB_VIEW
        return 404, {"error": {"message": "no", "code": "x"}}

    with _stand_in(answer) as url:
        yield url


@pytest.mark.parametrize(
    "args",
    [
        # no server answers: the submit's retries wait 3.5 s before it gives up
        pytest.param(["run", "--detach", "--", "true"], marks=pytest.mark.slow),
        # sizes are parsed without the wire models too
        ["run", "--detach", "--memory", "2G", "--log-limit", "64M", "--", "true"],
    ],
)
def test_run_detach_imports_and_builds_only_what_it_uses(accepting_server, args):
    import os

    env = {**os.environ, "CORRAL_SERVER": accepting_server, "CORRAL_TOKEN": "t"}
    r = subprocess.run(
        [sys.executable, "-c", RUN_PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    result = json.loads(r.stderr.strip().splitlines()[-1])
    assert (result["code"], r.stdout) == (0, "7\n"), r.stderr
    modules = set(result["modules"])
    assert not [m for m in NOT_FOR_RUN if m in modules]
    assert "httpx" in modules  # it did send the job
    # no wire model at all: the job the server took needs no checking, and only its id
    # is printed
    assert result["built"] == []


@pytest.fixture
def refusing_server():
    """A stand-in for the API that refuses every submit as the real one refuses a job
    spec it cannot accept (422); it counts the submits it was sent."""
    seen: list[dict] = []

    def answer(_path: str, body: bytes) -> tuple[int, dict]:
        seen.append(json.loads(body))
        return 422, {"error": {"message": "server says no", "code": "invalid"}}

    with _stand_in(answer) as url:
        yield url, seen


def _client_check(**spec) -> str:
    """What `corral run` says of a job spec the client's own check (JobSubmit) refuses."""
    from pydantic import ValidationError

    from corral.api.jobs import JobSubmit

    with pytest.raises(ValidationError) as exc:
        JobSubmit(**spec)
    return f"error: {exc.value}\n"


def test_a_refused_job_spec_is_told_as_the_client_check_tells_it(refusing_server):
    """`corral run` sends the job without checking it first (the server checks it); when
    the server refuses it, the client's own check says why, in the words it always
    used, with exit code 2."""
    url, seen = refusing_server
    env = {**os.environ, "CORRAL_SERVER": url, "CORRAL_TOKEN": "t"}
    r = subprocess.run(
        [sys.executable, "-m", "corral", "run", "--detach", "--cpus", "0", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr == _client_check(command=["true"], cpus=0.0)
    assert len(seen) == 1  # not retried


# a job spec JobSubmit refuses, and whether it can be sent at all (the server refuses what
# it is sent; what does not encode as JSON, an undecodable argument or NaN, is not sent)
BAD_SPECS = [
    ({"command": ["true"], "cpus": 0.0}, 1),
    ({"command": [""]}, 1),
    ({"command": ["true"], "env": {"A": "x\x00y"}}, 1),
    ({"command": ["true"], "env": {"A": "1"}, "secret_env": {"A": "2"}}, 1),
    ({"command": ["true"], "no_such_field": 1}, 1),
    ({"command": ["true", "\udcff"]}, 0),
    ({"command": ["true"], "cpus": float("nan")}, 0),
]


@pytest.mark.parametrize(("spec", "sent"), BAD_SPECS)
def test_submit_for_id_refuses_what_submit_refuses(refusing_server, spec, sent):
    from pydantic import ValidationError

    from corral.client.sdk import Client

    url, seen = refusing_server
    with Client(server=url, token="t") as c, pytest.raises(ValidationError) as exc:
        c.submit_for_id(**spec)
    assert f"error: {exc.value}\n" == _client_check(**spec)
    assert len(seen) == sent


def test_a_bad_job_spec_is_refused_at_once_when_no_server_answers():
    """No server to check it: the client's check refuses the spec, without the submit's
    retries and their back-off."""
    from pydantic import ValidationError

    from corral.client.sdk import Client

    spec = {"command": ["true"], "cpus": 0.0}
    with (
        Client(server="http://127.0.0.1:9", token="t") as c,
        mock.patch("corral.client.sdk.time.sleep") as sleep,
        pytest.raises(ValidationError) as exc,
    ):
        c.submit_for_id(**spec)
    assert f"error: {exc.value}\n" == _client_check(**spec)
    assert sleep.call_count == 0


def test_the_sdk_leaves_httpx_whole():
    """Only the `corral` command skips httpx's CLI; a program using the SDK keeps it."""
    code = "import corral.client.sdk, httpx._main, httpx\nprint(httpx.main is httpx._main.main)"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert (r.returncode, r.stdout.strip()) == (0, "True"), r.stderr


def test_wire_models_are_built_on_first_use():
    code = (
        "import corral.api.jobs as j\n"
        "print(j.JobView.__pydantic_complete__)\n"
        "v = j.JobView.model_validate(" + repr(JOB_VIEW) + ")\n"
        "print(j.JobView.__pydantic_complete__, v.created_at.isoformat())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "2026-01-01T00:00:00Z"]


def _names(app) -> dict[str, str]:
    """{command or group name: the module that defines it} of a Typer app."""
    from typer.main import get_command_name

    out = {}
    for c in app.registered_commands:
        out[c.name or get_command_name(c.callback.__name__)] = c.callback.__module__
    for g in app.registered_groups:
        out[g.name] = g.typer_instance.registered_commands[0].callback.__module__
    return out


def test_the_command_table_says_where_each_command_lives():
    """`corral NAME` imports only COMMAND_MODULES[NAME]: a command added to another
    module without its line in the table would be missing from `corral NAME`."""
    import corral.cli

    names = _names(corral.cli.full_app())
    elsewhere = {n: m for n, m in names.items() if m not in ("corral.client.cli", "corral.cli")}
    assert elsewhere == corral.cli.COMMAND_MODULES
    assert set(corral.cli.MODULES) == set(elsewhere.values())


def test_help_lists_the_daemons_after_the_user_commands():
    import corral.cli

    modules = list(_names(corral.cli.full_app()).values())
    commands = modules[: len(corral.cli.full_app().registered_commands)]
    assert commands == sorted(commands, key=lambda m: m == "corral.cli")
    assert commands[-3:] == ["corral.cli"] * 3


@pytest.mark.slow  # every command's help, twice: ~10 s
def test_one_command_app_answers_as_the_whole_app_does():
    """What `corral NAME ...` runs (an app holding only NAME) prints and exits as the
    whole app does: the help of every command and group, and usage errors."""
    from typer.testing import CliRunner

    import corral.cli

    runner = CliRunner()
    names = list(_names(corral.cli.full_app()))
    cases = [[name, "--help"] for name in names] + [
        ["--ca", "ca.pem", "run", "--help"],
        ["run", "--no-such-option"],
        ["run"],
        ["fleet", "nosuch"],
        ["job"],
    ]
    # `--ca` sets CORRAL_CA in this process (for the SDK it builds): keep it from
    # leaking into later tests of this worker, whose agents would inherit it
    with mock.patch.dict(os.environ):
        for argv in cases:
            only = corral.cli.command_for(argv)
            assert len(only.registered_commands) + len(only.registered_groups) == 1
            got = runner.invoke(only, argv)
            want = runner.invoke(corral.cli.full_app(), argv)
            assert (got.exit_code, got.output) == (want.exit_code, want.output), argv


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["run", "--detach", "--", "true"], "run"),
        (["--ca", "x.pem", "jobs"], "jobs"),
        (["--ca=x.pem", "fleet", "apply", "f.yml"], "fleet"),
        (["--help"], None),
        (["--version", "jobs"], None),
        ([], None),
        (["--ca"], None),
        (["--server", "http://a:8470", "--token", "t", "jobs"], "jobs"),
        (["--server=http://a:8470", "run", "--", "true"], "run"),
    ],
)
def test_command_name(args, name):
    from corral.cli import command_name

    assert command_name(args) == name


def test_unknown_or_no_command_gets_the_whole_app():
    import corral.cli

    whole = corral.cli.full_app()
    for args in (["nosuch"], ["--help"], []):
        assert len(corral.cli.command_for(args).registered_commands) == len(
            whole.registered_commands
        )
