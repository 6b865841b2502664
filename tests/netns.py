"""Hosts for multi-host tests: Linux network namespaces joined by veth pairs, real TCP between them.

One namespace is the hub (the router's host); every other one gets its own veth link to it, on its
own /24 inside 198.18.0.0/15 (RFC 2544's benchmarking range): hub 198.18.N.1, peer 198.18.N.2.
Addresses exist only inside the namespaces made here, which are removed (with their links and any
process left in them) on exit. Needs root and iproute2; `unavailable()` says why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_COMMAND_TIMEOUT_S = 30
_KILL_WAIT_S = 10.0


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (.ci/run installs it)"
    probe = f"bmpool-probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Link:
    hub_address: str
    peer_address: str
    hub_interface: str  # in the hub namespace: set it down to cut the peer off


@dataclass
class Hosts:
    hub: str
    prefix: str = field(default_factory=lambda: f"bmpool-{os.getpid()}")
    links: dict[str, Link] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> Hosts:
        self._add(self.hub)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def add_peer(self, host: str) -> Link:
        """A new host linked to the hub."""
        self._add(host)
        number = len(self.links) + 1
        hub_if, peer_if = f"v{number}h", f"v{number}p"
        link = Link(f"198.18.{number}.1", f"198.18.{number}.2", hub_if)
        self._check("-n", self.name(self.hub), "link", "add", hub_if, "type", "veth", "peer", "name", peer_if,
                    "netns", self.name(host))  # fmt: skip
        for namespace, interface, address in (
            (self.hub, hub_if, link.hub_address),
            (host, peer_if, link.peer_address),
        ):
            self._check("-n", self.name(namespace), "addr", "add", f"{address}/24", "dev", interface)
            self._check("-n", self.name(namespace), "link", "set", interface, "up")
        self.links[host] = link
        return link

    def cut(self, host: str) -> None:
        """Take the host's link down: packets are dropped, no connection is told."""
        self._check("-n", self.name(self.hub), "link", "set", self.links[host].hub_interface, "down")

    def mend(self, host: str) -> None:
        self._check("-n", self.name(self.hub), "link", "set", self.links[host].hub_interface, "up")

    def start(self, host: str, argv: list[str], log: Path, **popen: object) -> subprocess.Popen[bytes]:
        """Run argv in the host's namespace (from the repository root), output to `log`."""
        with log.open("wb") as output:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name(host), *argv],
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
                process_group=0,
                **popen,  # type: ignore[arg-type]
            )
        self._processes.append(process)
        return process

    def run(self, host: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name(host), *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + _KILL_WAIT_S
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for namespace in reversed(self._made):
            for pid in _ip("netns", "pids", namespace).stdout.split():
                os.kill(int(pid), signal.SIGKILL)  # anything still in our namespace is ours
            _ip("netns", "del", namespace)
        self._made.clear()

    def _add(self, host: str) -> None:
        namespace = self.name(host)
        self._check("netns", "add", namespace)
        self._made.append(namespace)
        self._check("-n", namespace, "link", "set", "lo", "up")

    def _check(self, *args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
