"""Issue 10 item 14: `corral outputs get` writes only inside `-o DEST`.

A server (compromised, or an impostor at the configured URL) lists outputs whose paths
climb out of the destination (`../`) or are absolute. The real CLI, run against a real
HTTP server on loopback that answers that way, refuses them with a clear error and
writes nothing anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from corral.testing import corral_cmd

BODY = b"planted by the server\n"
SHA = hashlib.sha256(BODY).hexdigest()


class HostileServer:
    def __init__(self, paths: list[str]):
        listing = [
            {
                "path": p,
                "sha256": SHA,
                "size": len(BODY),
                "attempt": 1,
                "state": "live",
                "copies": 1,
                "durable": False,
            }
            for p in paths
        ]
        self.downloads = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.endswith("/outputs"):
                    data = json.dumps(listing).encode()
                elif self.path.endswith("/content"):
                    outer.downloads += 1
                    data = BODY
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _get(server: HostileServer, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": "adm_x"}
    return subprocess.run(
        corral_cmd("outputs", "get", "7", *args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/corral-escaped.txt", "..", ""]
)
def test_outputs_get_refuses_paths_that_escape_dest(tmp_path: Path, bad: str):
    work = tmp_path / "work"
    work.mkdir()
    outside = Path("/tmp/corral-escaped.txt")
    outside.unlink(missing_ok=True)
    with HostileServer(["fine.txt", bad]) as server:
        r = _get(server, work, "-o", "dest")
        assert r.returncode != 0, r.stdout
        assert "escape" in r.stderr and "dest" in r.stderr, r.stderr
        assert server.downloads == 0  # refused before anything was fetched
    assert not (tmp_path / "escaped.txt").exists()
    assert not (work / "escaped.txt").exists()
    assert not outside.exists()
    assert not (work / "dest").exists() or not any((work / "dest").rglob("*"))


@pytest.mark.slow
def test_outputs_get_one_path_refuses_it_too(tmp_path: Path):
    with HostileServer(["../escaped.txt"]) as server:
        r = _get(server, tmp_path, "../escaped.txt")
        assert r.returncode != 0 and "escape" in r.stderr, r.stderr
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.slow
def test_outputs_get_writes_nested_paths_inside_dest(tmp_path: Path):
    with HostileServer(["a/b/ok.txt", "top.txt"]) as server:
        r = _get(server, tmp_path, "-o", "dest")
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "dest" / "a" / "b" / "ok.txt").read_bytes() == BODY
    assert (tmp_path / "dest" / "top.txt").read_bytes() == BODY
