"""The client never loads the server stack: `corral --help`, the client commands and
`import corral` run without FastAPI, SQLAlchemy, Alembic, asyncpg or uvicorn; the
packaging keeps them in the `server` extra; the daemons say how to get them."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_STACK = ("fastapi", "sqlalchemy", "alembic", "asyncpg", "uvicorn", "aiosqlite", "jinja2")

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
        ["run", "--detach", "--", "true"],
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
    assert not base & {"fastapi", "uvicorn", "sqlalchemy", "alembic", "asyncpg", "aiosqlite"}
    server = {_name(d) for d in project["optional-dependencies"]["server"]}
    assert {"fastapi", "uvicorn", "sqlalchemy", "alembic", "asyncpg", "aiosqlite"} <= server
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
