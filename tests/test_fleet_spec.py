"""The fleet file is parsed by one pydantic model (FleetSpec): every key is checked,
an unknown setting or backend is an error naming it (and what is known), and an SSH
fleet's hosts are validated before anything reaches a server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from corral.api import FleetSpec, SshSettings
from corral.cli import app
from corral.client.data_cli import validation_errors


def problems(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as err:
        FleetSpec.model_validate(data)
    return validation_errors(err.value)


def test_an_unknown_backend_is_refused_naming_the_known_ones():
    assert problems({"name": "gpu", "backend": "aws"}) == [
        "backend: unknown backend 'aws'; known backends: local, ssh"
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "g", "bakend": "ssh"}, "unknown setting(s) bakend in the fleet; known: name"),
        ({"name": "g", "instance": {"gpus": 1}}, "unknown setting(s) gpus in instance"),
        (
            {"name": "g", "backend": "ssh", "hosts": [{"host": "a", "prot": 22}]},
            "hosts[0]: unknown setting(s) prot in a host; known: host, port, user",
        ),
        ({"name": "g", "min": 3, "max": 1}, "min (3) is above max (1)"),
        ({"name": "g", "backend": "ssh", "max": 1}, "hosts: an ssh fleet needs at least one host"),
        (
            {"name": "g", "backend": "ssh", "max": 3, "hosts": ["a", "b"]},
            "max (3) is above the number of hosts (2)",
        ),
        (
            {"name": "g", "backend": "ssh", "max": 2, "hosts": ["a", "root@a:22"]},
            "hosts: listed twice: ssh:root@a:22",
        ),
        (
            {"name": "g", "hosts": ["a"], "wipe": True},
            "hosts, wipe: only an ssh fleet has these (backend is local)",
        ),
        (
            {"name": "g", "backend": "ssh", "hosts": [{"host": "a", "prefix": "bin"}]},
            "hosts[0].prefix: 'bin': must be an absolute path on the host",
        ),
        (
            {"name": "g", "backend": "ssh", "hosts": [{"host": "a;rm -rf /"}]},
            "hosts[0].host: 'a;rm -rf /' is not a host name or address",
        ),
        (
            {"name": "g", "backend": "ssh", "hosts": ["a b"]},
            "hosts[0]: 'a b' is not [user@]host[:port]",
        ),
        ({"name": "g", "instance": {"memory": "lots"}}, "instance.memory: 'lots' is not a size"),
    ],
)
def test_every_key_is_checked_and_named(data, message):
    found = problems(data)
    assert any(message in p for p in found), found


def test_an_ssh_fleet_file_in_short_and_long_form():
    spec = FleetSpec.model_validate(
        {
            "name": "lab",
            "backend": "ssh",
            "min": 1,
            "max": 3,
            "instance": {"cpus": 2, "memory": "1G"},
            "hosts": [
                "10.0.0.5",
                "ubuntu@gpu-2.lan:2222",
                {
                    "host": "gpu-3.lan",
                    "identity_file": "~/.ssh/id_ed25519",
                    "proxy_jump": "jump@bastion:22",
                    "memory": "16G",
                    "cpus": 8,
                    "labels": {"gpu": "a100"},
                },
            ],
            "known_hosts": "/etc/corral/known_hosts",
            "wipe": True,
        }
    )
    assert (spec.min_size, spec.max_size, spec.cpus, spec.memory_mb) == (1, 3, 2.0, 1024)
    assert [h.ref for h in spec.hosts or []] == [
        "ssh:root@10.0.0.5:22",
        "ssh:ubuntu@gpu-2.lan:2222",
        "ssh:root@gpu-3.lan:22",
    ]
    stored = SshSettings.model_validate(spec.settings()["ssh"])
    assert stored.hosts[2].memory_mb == 16384 and stored.hosts[2].proxy_jump == "jump@bastion:22"
    assert stored.known_hosts == "/etc/corral/known_hosts" and stored.wipe
    # the API's own names are accepted too, and a dump validates again as the same fleet
    assert FleetSpec.model_validate(spec.model_dump()) == spec


def test_a_local_fleet_stores_nothing_of_ssh():
    spec = FleetSpec.model_validate({"name": "cpu", "min": 0, "max": 4})
    assert spec.settings() == {}
    assert FleetSpec.model_validate(spec.model_dump()).backend == "local"


def test_corral_fleet_apply_names_the_bad_key_before_reaching_a_server(tmp_path: Path):
    bad = tmp_path / "fleet.yml"
    runner = CliRunner()
    for text, named in [
        ("name: gpu\nbackend: aws\n", "unknown backend 'aws'; known backends: local, ssh"),
        ("name: gpu\nbackend: ssh\nhosts:\n  - {host: a, prot: 22}\n", "prot"),
        ("name: gpu\nmax: 2\nzones: [a]\n", "zones"),
    ]:
        bad.write_text(text)
        # no server listens on port 9: the file is refused before any request
        r = runner.invoke(
            app, ["fleet", "apply", str(bad), "--server", "http://127.0.0.1:9", "--token", "x"]
        )
        assert r.exit_code == 2, r.output
        assert named in " ".join(r.output.split()), r.output
        assert "cannot reach" not in r.output


def test_the_fleet_files_in_the_readme_are_valid():
    """Every fleet file README.md shows (the yaml blocks and the quick start's)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    blocks += re.findall(r"cat > \S+\.yml <<'EOF'\n(.*?)EOF\n", readme, re.S)
    fleets = [yaml.safe_load(b) for b in blocks]
    fleets = [f for f in fleets if isinstance(f, dict) and "name" in f]
    assert {f["backend"] for f in fleets} == {"local", "ssh"} and len(fleets) >= 3
    for f in fleets:
        FleetSpec.model_validate(f)
