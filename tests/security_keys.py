"""Key material for the security tests, made fresh in a folder: TLS certificates (trustme: a test
CA, a server certificate, a client certificate), CURVE keypairs (the real scripts/keygen.py) and
API key files."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trustme

REPO = Path(__file__).resolve().parents[1]
KEYGEN = REPO / "scripts" / "keygen.py"
GOOD_KEY = "k-" + "a" * 30
OTHER_KEY = "k-" + "b" * 30
WRONG_KEY = "k-" + "z" * 30


@dataclass(frozen=True)
class TlsFilesForTest:
    ca_cert: Path  # what clients trust (and the server's client CA under mTLS)
    server_cert: Path
    server_key: Path
    client_cert: Path  # a client certificate the CA signed
    client_key: Path

    def ca_bytes(self) -> bytes:
        return self.ca_cert.read_bytes()

    def client_pair(self) -> tuple[bytes, bytes]:
        return self.client_key.read_bytes(), self.client_cert.read_bytes()


def make_tls(folder: Path, *hosts: str) -> TlsFilesForTest:
    """A CA and a server certificate for `hosts` (default: localhost and 127.0.0.1), in PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*(hosts or ("localhost", "127.0.0.1")))
    client = ca.issue_cert("client@test")
    files = TlsFilesForTest(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    files.server_key.chmod(0o600)
    with files.server_cert.open("wb") as chain:
        for blob in server.cert_chain_pems:
            chain.write(blob.bytes())
    client.private_key_pem.write_to_path(str(files.client_key))
    with files.client_cert.open("wb") as chain:
        for blob in client.cert_chain_pems:
            chain.write(blob.bytes())
    return files


def make_curve_keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """(public file, secret file), written by the real key generation command."""
    subprocess.run(
        [sys.executable, str(KEYGEN), "curve", str(folder), name], check=True, capture_output=True, timeout=60
    )
    return folder / f"{name}.key", folder / f"{name}.key_secret"


def write_api_keys(path: Path, *keys: str) -> Path:
    path.write_text("# pool API keys\n" + "".join(f"{key}\n" for key in keys), encoding="utf-8")
    path.chmod(0o600)
    return path
