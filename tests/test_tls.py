"""TLS (issue 10, item 15): `corral server --tls-cert/--tls-key` serves https; agents
and the CLI trust a private CA given with `--ca FILE` or `CORRAL_CA`; a client that
does not trust the server's certificate is refused with a clear error. The CA and the
server certificate are made by the test."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from corral.testing import Cluster, corral_cmd, job_python

pytestmark = pytest.mark.e2e


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 and localhost: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def cli(server, *args: str, ca: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    env.pop("CORRAL_CA", None)
    if ca is not None:
        env["CORRAL_CA"] = str(ca)
    return subprocess.run(corral_cmd(*args), env=env, capture_output=True, text=True, timeout=90)


def test_server_agent_and_cli_work_over_https_with_a_private_ca(
    cluster: Cluster, tmp_path: Path, jobfiles: Path
):
    ca, cert, key = make_pki(tmp_path / "pki")
    server = cluster.server(extra=["--tls-cert", str(cert), "--tls-key", str(key)], ca=ca)
    assert server.url.startswith("https://")
    cluster.agent(server, name="a1", extra=["--ca", str(ca)])
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)

    # a job over https: the agent gets it, its runner reports its output, and its
    # working directory (shipped with -w) is fetched from the server over https
    work = jobfiles / "work"
    work.mkdir()
    (work / "data.txt").write_text("over tls\n")
    r = cli(
        server,
        "run",
        "-w",
        str(work),
        "--",
        job_python(),
        "-c",
        "print(open('data.txt').read().strip())",
        ca=ca,
    )
    assert (r.returncode, r.stdout) == (0, "over tls\n"), r.stderr
    r = cli(server, "--ca", str(ca), "jobs", "--json")  # the flag as well as CORRAL_CA
    assert r.returncode == 0, r.stderr

    # a client that does not trust the CA is refused, and told what to do
    r = cli(server, "jobs")
    assert r.returncode == 1
    assert "certificate" in r.stderr and "--ca" in r.stderr and "CORRAL_CA" in r.stderr
    assert "Traceback" not in r.stderr
