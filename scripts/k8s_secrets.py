"""Write the Kubernetes Secrets that deploy/kubernetes/ mounts, from a folder of keys.

    python scripts/k8s_secrets.py --keys pool-keys --tls-cert server.crt --tls-key server.key \\
        [--client-ca ca.crt] --out secrets.yaml
    kubectl apply -f secrets.yaml && rm secrets.yaml

Missing keys are made in --keys first (scripts/keygen.py: CURVE keypairs `router` and `worker`, API
key files `api_keys` for clients and `admin_api_keys` for operators); existing ones are kept, so
rotating is: edit or add files in --keys, run again, apply, then `kill -HUP 1` in the router pod
(README "Deploying on several hosts"). Every `*.key` file in --keys/allowed/ is a worker public key
the router accepts; `worker.key` is put there on first use. The output holds secrets: it is written mode 600.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from keygen import new_api_key, write_curve_keypair

NAMESPACE = "bm-pool"


def ensure_keys(folder: Path) -> None:
    for name in ("router", "worker"):
        if not (folder / f"{name}.key_secret").exists():
            write_curve_keypair(folder, name)
    allowed = folder / "allowed"
    if not allowed.exists():
        allowed.mkdir(mode=0o700)
        (allowed / "worker.key").write_bytes((folder / "worker.key").read_bytes())
    for name in ("api_keys", "admin_api_keys"):
        api_keys = folder / name
        if not api_keys.exists():
            descriptor = os.open(api_keys, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(f"{new_api_key()}\n")


def secret(name: str, files: dict[str, Path], kind: str = "Opaque") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "bm-pool"},
        },
        "type": kind,
        "data": {key: base64.b64encode(path.read_bytes()).decode("ascii") for key, path in files.items()},
    }


def secrets(keys: Path, tls_cert: Path, tls_key: Path, client_ca: Path | None) -> list[dict]:
    tls_files = {"tls.crt": tls_cert, "tls.key": tls_key} | ({"ca.crt": client_ca} if client_ca else {})
    allowed = {path.name: path for path in sorted((keys / "allowed").glob("*.key"))}
    return [
        secret("bm-pool-tls", tls_files, "kubernetes.io/tls"),
        secret("bm-pool-api-keys", {"api_keys": keys / "api_keys"}),
        secret("bm-pool-admin-keys", {"admin_api_keys": keys / "admin_api_keys"}),
        secret("bm-pool-curve-router", {"router.key_secret": keys / "router.key_secret"}),
        secret("bm-pool-curve-allowed", allowed),
        secret(
            "bm-pool-curve-worker",
            {"worker.key_secret": keys / "worker.key_secret", "router.key": keys / "router.key"},
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/k8s_secrets.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keys", type=Path, required=True, help="folder of the pool's keys (made if missing)"
    )
    parser.add_argument("--tls-cert", type=Path, required=True, help="the fronts' PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, required=True, help="its PEM private key")
    parser.add_argument("--client-ca", type=Path, help="PEM CA for mutual TLS (set client_ca_file too)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_keys(args.keys)
    documents = secrets(args.keys, args.tls_cert, args.tls_key, args.client_ca)
    descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        yaml.safe_dump_all(documents, file, sort_keys=False)
    print(
        f"{args.out}: {len(documents)} Secrets in namespace {NAMESPACE} (kubectl apply -f it, then delete it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
