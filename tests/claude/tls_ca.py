"""A throw-away test CA and a server certificate it signed, made with the openssl CLI.

The agent's API relay verifies the API host's certificate (never off); tests
give the agent this CA with --api-ca-cert and serve the fake model over TLS
with the server certificate, for the names and addresses the tests dial.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestCA:
    __test__ = False  # a fixture's value, not a test class
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx


def make_test_ca(directory: Path, names: list[str], addresses: list[str]) -> TestCA:
    d = directory

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req", "-x509", *curve, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
        "-days", "2", "-subj", "/CN=cowork test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    run(
        "req", *curve, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
        "-subj", f"/CN={names[0]}",
    )  # fmt: skip
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{a}" for a in addresses])
    (d / "ext.cnf").write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    run(
        "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
        "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"),
        "-days", "2", "-extfile", str(d / "ext.cnf"),
    )  # fmt: skip
    for f in d.iterdir():
        f.chmod(0o644 if f.suffix == ".pem" else 0o600)
    return TestCA(d / "ca.pem", d / "server.pem", d / "server.key")
