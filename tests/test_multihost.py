"""The pool across hosts for real: network namespaces joined by veth pairs (tests/netns.py), real
processes in each. The router's host is the hub; two worker hosts run a supervisor with --router
(paced workers, CURVE keypairs of their own); a client host calls over TLS with mutual TLS and an
API key; a rogue host floods the worker port with an unknown CURVE key and with none.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2); CI runs as root.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests import netns
from tests.security_keys import (
    GOOD_KEY,
    WRONG_KEY,
    TlsFilesForTest,
    make_curve_keypair,
    make_tls,
    write_api_keys,
)

_WHY_NOT = netns.unavailable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

GRPC_PORT = 18000
HTTP_PORT = 18080
WORKER_PORT = 18100
WAIT_S = 60.0  # generous bounds: the condition is awaited, never timed
HOST_DEVICES = {"host1": 1, "host2": 2}  # a device id per host: worker ids then tell the hosts apart
ROUTER = {
    "listen": f"0.0.0.0:{GRPC_PORT}",  # every interface of the router's own namespace
    "zmq_bind": f"tcp://0.0.0.0:{WORKER_PORT}",
    "heartbeat_interval_s": 0.25,
    "liveness": 4,
    "queue_timeout_s": 60.0,
    "drain_timeout_s": 2.0,
}
PACED = {"tokens_per_second": 20.0, "first_token_delay_s": 0.2, "tokens_per_request": 20, "echo": True}


@dataclass
class Pool:
    hosts: netns.Hosts
    folder: Path
    tls: TlsFilesForTest
    router_log: Path
    router_public_key: Path

    def worker_endpoint(self, host: str) -> str:
        return f"tcp://{self.hosts.links[host].hub_address}:{WORKER_PORT}"

    def client_argv(
        self, *command: str, api_key: str | None = GOOD_KEY, certificate: bool = True, port: int = GRPC_PORT
    ) -> list[str]:
        """The client run in the client host, calling the router's front on `port` (gRPC or HTTP)."""
        target = f"{self.hosts.links['client'].hub_address}:{port}"
        argv = [sys.executable, "-m", "tests.netns_client", "--target", target, "--ca", str(self.tls.ca_cert)]
        if certificate:
            argv += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        if api_key is not None:
            argv += ["--api-key", api_key]
        return [*argv, *command]

    def client(self, *command: str, **options: object) -> list[dict]:
        done = self.hosts.run("client", self.client_argv(*command, **options), timeout_s=WAIT_S)  # type: ignore[arg-type]
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.router_log.read_text(errors="replace").splitlines() if needle in line]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def write_config(path: Path, security: dict, devices: list[int], http: str | None = None) -> Path:
    config = {
        "router": ROUTER,
        "http": {"listen": http},
        "model": {"name": "paced", "engine": "paced", "paced": PACED},
        "workers": {"devices": devices, "reconnect_backoff_s": 0.25, "reconnect_backoff_max_s": 1.0},
        "security": security,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    folder = tmp_path_factory.mktemp("multihost")
    with netns.Hosts(hub="router") as hosts:
        for host in ("host1", "host2", "rogue", "client"):
            hosts.add_peer(host)
        tls = make_tls(folder / "tls", hosts.links["client"].hub_address)
        keys = write_api_keys(folder / "api_keys", GOOD_KEY)
        curve = folder / "curve"
        allowed = curve / "allowed"
        allowed.mkdir(parents=True)
        router_public, router_secret = make_curve_keypair(curve, "router")
        for host in HOST_DEVICES:
            public, _ = make_curve_keypair(curve, host)
            (allowed / public.name).write_bytes(public.read_bytes())
        make_curve_keypair(curve, "rogue")
        router_security = {
            "tls": {
                "cert_file": str(tls.server_cert),
                "key_file": str(tls.server_key),
                "client_ca_file": str(tls.ca_cert),
            },
            "api_keys_file": str(keys),
            "curve": {
                "enabled": True,
                "router_secret_key": str(router_secret),
                "allowed_workers_dir": str(allowed),
            },
        }
        router_config = write_config(
            folder / "router.yaml", router_security, [0], http=f"0.0.0.0:{HTTP_PORT}"
        )
        router_log = folder / "router.log"
        hosts.start("router", [sys.executable, "-m", "router", "--config", str(router_config)], router_log)
        pool = Pool(hosts, folder, tls, router_log, router_public)
        for host, device in HOST_DEVICES.items():
            worker_security = {
                "curve": {
                    "enabled": True,
                    "worker_secret_key": str(curve / f"{host}.key_secret"),
                    "router_public_key": str(router_public),
                }
            }
            config = write_config(folder / f"{host}.yaml", worker_security, [device])
            argv = [
                sys.executable,
                "-m",
                "supervisor",
                "--config",
                str(config),
                "--router",
                pool.worker_endpoint(host),
            ]
            hosts.start(host, argv, folder / f"{host}.log")
        for device in HOST_DEVICES.values():
            wait_for(
                lambda device=device: pool.log_lines(f"-dev{device}-w0-"), f"a worker of device {device}"
            )
        yield pool


def ends(events: list[dict]) -> list[dict]:
    return sorted((event for event in events if event["event"] == "end"), key=lambda event: event["index"])


def host_of(worker_id: str) -> str:
    return next(host for host, device in HOST_DEVICES.items() if f"-dev{device}-" in worker_id)


def test_workers_on_two_hosts_serve_a_client_over_tls_and_curve(pool):
    results = ends(pool.client("streams", "--count", "4", "--prompt", "bonjour"))
    assert [result["status"] for result in results] == ["OK"] * 4
    assert all(result["text"].startswith("bonjour") for result in results)  # echo: each its own answer
    assert {host_of(result["worker"]) for result in results} == {"host1", "host2"}


def test_tls_and_api_key_from_another_host(pool):
    wrong = ends(pool.client("streams", api_key=WRONG_KEY))
    missing = ends(pool.client("streams", api_key=None))
    assert [(result["status"], result["details"]) for result in wrong + missing] == [
        ("UNAUTHENTICATED", "this service needs an API key: send it as 'authorization: Bearer <key>'")
    ] * 2
    # Mutual TLS: without a client certificate the handshake fails, whatever the key.
    assert ends(pool.client("streams", certificate=False))[0]["status"] == "UNAVAILABLE"
    assert pool.client("health", api_key=None) == [{"event": "health", "status": "SERVING"}]


def test_the_http_front_over_tls_with_an_api_key_from_another_host(pool):
    (models,) = pool.client("http", port=HTTP_PORT)
    assert models["status"] == 200 and models["body"]["object"] == "list"
    (missing,) = pool.client("http", port=HTTP_PORT, api_key=None)
    assert missing["status"] == 401 and missing["body"]["error"]["code"] == "invalid_api_key"
    (wrong,) = pool.client("http", port=HTTP_PORT, api_key=WRONG_KEY)
    assert wrong["status"] == 401 and wrong["body"]["error"]["type"] == "authentication_error"
    (no_certificate,) = pool.client("http", port=HTTP_PORT, certificate=False)
    assert no_certificate["status"] is None  # mutual TLS: the handshake fails


def test_a_rogue_peer_never_registers_never_gets_a_prompt_and_service_goes_on(pool):
    rogue_key = str(pool.folder / "curve" / "rogue.key_secret")
    endpoint = pool.worker_endpoint("rogue")
    base = [
        sys.executable,
        "-m",
        "tests.netns_rogue",
        "--endpoint",
        endpoint,
        "--router-key",
        str(pool.router_public_key),
    ]
    with_key = pool.hosts.start("rogue", [*base, "--secret", rogue_key], pool.folder / "rogue-curve.json")
    plain = pool.hosts.start("rogue", base, pool.folder / "rogue-plain.json")
    results = ends(pool.client("streams", "--count", "4"))  # while the flood goes on
    assert with_key.wait(WAIT_S) == 0 and plain.wait(WAIT_S) == 0
    assert [result["status"] for result in results] == ["OK"] * 4
    curve_report = json.loads((pool.folder / "rogue-curve.json").read_text())
    plain_report = json.loads((pool.folder / "rogue-plain.json").read_text())
    for report in (curve_report, plain_report):
        assert report["received"] == 0 and report["handshake_succeeded"] == 0, report
    assert curve_report["handshake_failed_auth"] >= 1, curve_report
    # A plain peer's handshake fails as a protocol error, or without detail when the router has
    # already closed the connection as the peer reads its greeting (seen on a busy machine).
    assert plain_report["handshake_failed_protocol"] + plain_report["handshake_failed"] >= 1, plain_report
    refusals = pool.log_lines(f"refused a worker connection from {pool.hosts.links['rogue'].peer_address}")
    assert 1 <= len(refusals) <= 2, refusals  # logged, rate-limited: not once per handshake
    assert not pool.log_lines("rogue")  # none of its messages (its id is "rogue") reached the router


def test_a_link_cut_ends_that_hosts_stream_queued_work_moves_and_the_host_rejoins(pool):
    before = {
        host_of(event["worker"]): event["worker"] for event in ends(pool.client("streams", "--count", "2"))
    }
    registrations = len(pool.log_lines(f"{before['host1']} registered"))
    events_path = pool.folder / "cut-client.jsonl"
    client = pool.hosts.start("client", pool.client_argv("streams", "--count", "4"), events_path)

    def events() -> list[dict]:
        return [json.loads(line) for line in events_path.read_text().splitlines() if line.startswith("{")]

    def first_on(host: str) -> list[dict]:
        return [event for event in events() if event["event"] == "first" and host_of(event["worker"]) == host]

    wait_for(lambda: first_on("host1") and first_on("host2"), "a stream on each host")
    cut_index = first_on("host1")[0]["index"]
    pool.hosts.cut("host1")
    try:
        assert client.wait(WAIT_S) == 0
    finally:
        pool.hosts.mend("host1")
    results = {result["index"]: result for result in ends(events())}
    assert results.pop(cut_index)["status"] == "UNAVAILABLE"
    assert [(result["status"], host_of(result["worker"])) for result in results.values()] == [
        ("OK", "host2")
    ] * 3
    # The host comes back: the same worker process (same id: its pid is in it) registers again.
    wait_for(
        lambda: len(pool.log_lines(f"{before['host1']} registered")) > registrations, "host1 re-registered"
    )
    after = {
        host_of(event["worker"]): event["worker"] for event in ends(pool.client("streams", "--count", "2"))
    }
    assert after == before
