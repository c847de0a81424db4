"""`corral agent --join-token-file F`: the join token comes from a file (as the ssh
backend and the bootstrap script pass it), never from the command line, and it
survives the agent re-executing into its committed build before it first registers."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest

from corral.testing import Cluster, Proc, corral_cmd, wait_for

pytestmark = pytest.mark.e2e


def test_agent_reads_its_join_token_from_a_file_even_across_a_build_switch(
    cluster: Cluster, tmp_path: Path
):
    server = cluster.server()
    client = cluster.client(server)
    token_file = tmp_path / "join.token"
    token_file.write_text(server.join_token + "\n")
    token_file.chmod(0o600)
    # a data dir that already holds a committed agent build (what the bootstrap script
    # seeds): the agent re-executes into it before its first registration
    data = tmp_path / "agent"
    build = f'#!/bin/sh\nexec {sys.executable} -m corral.agent "$@"\n'.encode()
    sha = hashlib.sha256(build).hexdigest()
    path = data / "components" / "agent" / sha / "agent"
    path.parent.mkdir(parents=True)
    path.write_bytes(build)
    path.chmod(0o755)
    (data / "components" / "agent" / "current.json").write_text(
        json.dumps(
            {
                "version": "1.0.0",
                "sha256": sha,
                "path": str(path),
                "installed_at": time.time(),
                "previous": None,
            }
        )
    )
    agent = Proc(
        corral_cmd(
            "agent",
            "--server",
            server.url,
            "--data-dir",
            str(data),
            "--name",
            "a1",
            "--join-token-file",
            str(token_file),
        ),
        tmp_path / "agent.log",
    ).start()
    cluster.procs.append(agent)
    (inst,) = cluster.wait_agents_running(client, 1)
    assert inst.agent_version == "1.0.0"  # it runs the committed build
    assert agent.alive() and "re-executing into the committed agent 1.0.0" in agent.log()
    assert server.join_token not in " ".join(agent.args)
    wait_for((data / "identity.json").exists, 10, "the agent's identity")
