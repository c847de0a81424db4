"""Shipping the user's code: `corral run -w DIR -- CMD`.

The CLI packs DIR deterministically (respecting .gitignore and .corralignore),
uploads it once as a content-addressed object, and the attempt starts in a private
extracted copy ($CORRAL_WORKDIR)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from corral.testing import Cluster, Proxy, corral_cmd, job_python

PY = job_python()

TRAIN = textwrap.dedent("""
    import json, os, sys
    out = os.environ["CORRAL_OUTPUT_DIR"]
    assert os.getcwd() == os.environ["CORRAL_WORKDIR"], (os.getcwd(), os.environ["CORRAL_WORKDIR"])
    files = sorted(
        os.path.relpath(os.path.join(d, f), ".") for d, _, fs in os.walk(".") for f in fs
    )
    import helper                      # a sibling module, shipped with the code
    with open(os.path.join(out, "model.txt"), "w") as f:
        f.write(helper.train(json.load(open("conf/params.json"))))
    print("files:", " ".join(files))
    print("lr from env file:", os.environ.get("LR"), os.environ.get("QUOTED"))
""")

HELPER = "def train(p):\n    return f\"trained with lr={p['lr']}\\n\"\n"


def _project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "conf").mkdir(parents=True)
    (proj / "data").mkdir()
    (proj / "train.py").write_text(TRAIN)
    (proj / "helper.py").write_text(HELPER)
    (proj / "conf" / "params.json").write_text('{"lr": 0.1}')
    (proj / "data" / "big.bin").write_bytes(b"\0" * 100_000)  # ignored by .gitignore
    (proj / "run.log").write_text("noise")  # ignored by .gitignore
    (proj / "secret.txt").write_text("not for the fleet")  # ignored by .corralignore
    (proj / ".gitignore").write_text("data/\n*.log\n")
    (proj / ".corralignore").write_text("secret.txt\n")
    (proj / ".git").mkdir()
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return proj


@pytest.mark.e2e
def test_run_with_a_workdir_ships_the_code_once(tmp_path: Path):
    proj = _project(tmp_path)
    env_file = tmp_path / "train.env"
    env_file.write_text('# settings\nLR=0.1\nexport QUOTED="a b"\n')
    with Cluster(tmp_path / "c") as c:
        server = c.server()
        c.agent(server, name="a1")
        client = c.client(server)
        c.wait_agents_running(client, 1)
        with Proxy([server.url]) as proxy:
            env = {**os.environ, "CORRAL_SERVER": proxy.url, "CORRAL_TOKEN": server.admin_token}

            def run() -> subprocess.CompletedProcess:
                return subprocess.run(
                    [
                        *corral_cmd("run", "-w", str(proj), "--env-file", str(env_file)),
                        "--",
                        PY,
                        "train.py",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    cwd=tmp_path,
                )

            first = run()
            assert first.returncode == 0, first.stderr
            assert "files: .corralignore .gitignore conf/params.json helper.py train.py" in (
                first.stdout
            ), first.stdout
            assert "lr from env file: 0.1 a b" in first.stdout
            uploads = [n for m, p, n in proxy.seen if m == "PUT" and p == "/api/v1/objects"]
            assert len(uploads) == 1 and uploads[0] > 0
            second = run()
            assert second.returncode == 0, second.stderr
            assert second.stdout == first.stdout
            uploads = [n for m, p, n in proxy.seen if m == "PUT" and p == "/api/v1/objects"]
            assert len(uploads) == 1, "the second run must upload nothing"
            assert "0 bytes uploaded" in second.stderr or "already" in second.stderr
        j1, j2 = client.jobs()[1], client.jobs()[0]
        assert j1.workdir is not None and j1.workdir == j2.workdir
        for j in (j1, j2):
            (o,) = client.outputs(j.id)
            got = client.download(o.sha256, tmp_path / f"model-{j.id}.txt")
            assert got.read_text() == "trained with lr=0.1\n"
