"""Schemathesis against a live `corral server`: every operation in /openapi.json is
fuzzed with bounded examples (positive and negative data, all checks). The run must
find no server error (5xx other than the documented 503), no status code and no
content type the schema does not document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.testing import Cluster

pytestmark = pytest.mark.e2e

HOOKS = Path(__file__).parent / "schemathesis_hooks"
MUST_PASS = {"not_a_server_error", "status_code_conformance", "content_type_conformance"}


def test_fuzzed_api_has_no_server_errors_and_no_undocumented_statuses(tmp_path: Path):
    pytest.importorskip("schemathesis")
    with Cluster(tmp_path / "c") as c:
        server = c.server()
        report = tmp_path / "report.ndjson"
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "corral_hooks",
            "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
        }
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{server.url}/openapi.json",
                "-H",
                f"Authorization: Bearer {server.admin_token}",
                "--checks",
                "all",
                "--phases",
                "examples,fuzzing",
                "--max-examples",
                "5",
                "--seed",
                "10",
                "--no-shrink",
                "--generation-database",
                "none",
                "--request-timeout",
                "10",
                "--workers",
                "1",
                "--no-color",
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(report),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = run.stdout + run.stderr
        assert report.exists(), out[-3000:]
        failed: dict[str, list[str]] = {}
        checked: set[str] = set()
        scenarios = 0
        errors: list[str] = []
        for line in report.read_text().splitlines():
            for kind, body in json.loads(line).items():
                if kind == "NonFatalError":
                    errors.append(json.dumps(body)[:500])
                if kind != "ScenarioFinished":
                    continue
                scenarios += 1
                label = body.get("recorder", {}).get("label", "?")
                for results in body.get("recorder", {}).get("checks", {}).values():
                    for check in results:
                        checked.add(check["name"])
                        if check["status"] == "failure":
                            failed.setdefault(check["name"], []).append(label)
        assert scenarios and checked >= MUST_PASS, out[-3000:]
        must = {name: sorted(set(where)) for name, where in failed.items() if name in MUST_PASS}
        assert not must, f"{must}\n{out[-6000:]}"
        assert not errors, f"{errors}\n{out[-4000:]}"  # e.g. a request that timed out
        assert "Traceback" not in server.log(), server.log()[-4000:]
