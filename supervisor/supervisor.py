"""Runs the pool on one host: the router and one worker per (device, index), restarted when they die.

Restarts back off exponentially (restart_backoff_s doubling up to restart_backoff_max_s); a process
that ran stably (stable_after_s) before dying starts afresh, and one that keeps dying right after
start (crash_loop_after times in a row) is a crash loop: reported, and held back at the max backoff.
Stopping (SIGTERM/SIGINT) is ordered: the router first, so it drains in-flight streams while the
workers still serve them, then the workers (SIGTERM, then SIGKILL after stop_grace_s). A second
signal skips the waiting.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import PoolConfig, WorkersConfig

log = logging.getLogger("supervisor")

_TICK_S = 0.1  # how often exits and due restarts are checked
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Backoff:
    settings: WorkersConfig
    quick_crashes: int = 0  # deaths in a row, each within stable_after_s of its start

    def delay_after(self, ran_for: float) -> float:
        """The wait before restarting a process that died after running `ran_for` seconds."""
        if ran_for >= self.settings.stable_after_s:
            self.quick_crashes = 0
        self.quick_crashes += 1
        if self.crash_looping:
            return self.settings.restart_backoff_max_s
        delay = self.settings.restart_backoff_s * 2 ** (self.quick_crashes - 1)
        return min(delay, self.settings.restart_backoff_max_s)

    @property
    def crash_looping(self) -> bool:
        return self.quick_crashes >= self.settings.crash_loop_after


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    backoff: Backoff
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = 0.0  # when to (re)start it; None while it runs
    starts: int = 0
    reports_restarts: bool = False  # a worker: tell it how often its slot was restarted (for the metrics)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def cpu_budget_problem(config: PoolConfig, cores: int) -> str | None:
    """Why the numpy workers would fight over the CPU, or None when they fit (or may oversubscribe)."""
    if config.model.engine != "numpy" or config.workers.allow_cpu_oversubscription:
        return None
    threads = config.workers.count * config.model.threads
    if threads <= cores:
        return None
    return (
        f"{config.workers.count} numpy workers x {config.model.threads} threads = {threads} threads, "
        f"but only {cores} cores are available; lower workers.devices, workers.per_device or model.threads, "
        "or set workers.allow_cpu_oversubscription: true"
    )


class Supervisor:
    def __init__(self, config_path: Path, config: PoolConfig, remote_router: str | None = None) -> None:
        """`remote_router`: run no local router; the workers connect to this ZeroMQ endpoint instead."""
        self._config = config
        path = str(config_path.resolve())
        self._router = None if remote_router else self._child("router", ["-m", "router", "--config", path])
        self._workers = [
            self._child(
                f"worker dev{group}-w{index}",
                ["-m", "worker", "--config", path, "--dev-id", group, "--index", str(index)]
                + (["--router", remote_router] if remote_router else []),
                reports_restarts=True,
                DEV_ID=group,
            )
            for group in config.workers.groups
            for index in range(config.workers.per_device)
        ]
        self._signals: list[int] = []

    def _child(self, name: str, args: list[str], reports_restarts: bool = False, **env: str) -> Child:
        return Child(
            name,
            [sys.executable, *args],
            {**os.environ, **env},
            Backoff(self._config.workers),
            reports_restarts=reports_restarts,
        )

    @property
    def _children(self) -> list[Child]:
        return ([self._router] if self._router else []) + self._workers

    def _forward_reload(self) -> None:
        """SIGHUP: the router re-reads its keys and certificates (workers load theirs at start)."""
        if self._router is not None:
            _send(self._router, signal.SIGHUP)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda received, _frame: self._signals.append(received))
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self._forward_reload())
        log.info(
            "starting %s and %d workers", "the router" if self._router else "no router", len(self._workers)
        )
        while not self._signals:
            now = time.monotonic()
            for child in self._children:
                self._look_after(child, now)
            time.sleep(_TICK_S)
        log.info("%s: stopping the pool", signal.Signals(self._signals[0]).name)
        self._stop()
        log.info("pool stopped")
        return 0

    def _look_after(self, child: Child, now: float) -> None:
        if child.restart_at is not None:
            if now >= child.restart_at:
                self._spawn(child, now)
        elif not child.running:
            self._schedule_restart(child, now)

    def _spawn(self, child: Child, now: float) -> None:
        child.started_at = now
        child.restart_at = None
        argv = child.argv
        if child.reports_restarts and child.starts:
            argv = [*argv, "--restarts", str(child.starts)]
        child.starts += 1
        try:
            child.process = subprocess.Popen(
                argv, env=child.env, process_group=0, preexec_fn=_exit_with_parent(os.getpid())
            )
        except OSError as error:
            log.error("cannot start %s: %s", child.name, error)
            child.process = None
            self._schedule_restart(child, now)
            return
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _schedule_restart(self, child: Child, now: float) -> None:
        ran_for = now - child.started_at
        delay = child.backoff.delay_after(ran_for)
        child.restart_at = now + delay
        if child.process is not None:
            how = _describe_exit(child.process.returncode)
            log.warning(
                "%s (pid %d) %s after %.1f s; restarting in %.2f s",
                child.name,
                child.process.pid,
                how,
                ran_for,
                delay,
            )
        if child.backoff.crash_looping:
            log.error(
                "%s is crash-looping: it died %d times in a row within %.0f s of starting; holding it back "
                "%.1f s between restarts (its own log above says why)",
                child.name,
                child.backoff.quick_crashes,
                self._config.workers.stable_after_s,
                delay,
            )

    def _stop(self) -> None:
        settings = self._config.workers
        if self._router and self._router.running:
            log.info(
                "stopping the router (it drains in-flight streams for up to %.0f s)",
                self._config.router.drain_timeout_s,
            )
            self._terminate([self._router], self._config.router.drain_timeout_s + settings.stop_grace_s)
        workers = [worker for worker in self._workers if worker.running]
        if workers:
            log.info("stopping %d workers", len(workers))
            self._terminate(workers, settings.stop_grace_s)

    def _terminate(self, children: list[Child], grace_s: float) -> None:
        """SIGTERM, wait up to `grace_s` (less on a second signal), then SIGKILL what is left."""
        for child in children:
            _send(child, signal.SIGTERM)
        signals_before = len(self._signals)
        deadline = time.monotonic() + grace_s
        while any(child.running for child in children):
            if time.monotonic() > deadline or len(self._signals) > signals_before:
                for child in children:
                    if child.running:
                        log.warning("%s did not stop in time: SIGKILL", child.name)
                        _send(child, signal.SIGKILL)
                        child.process.wait()
                return
            time.sleep(_TICK_S)


def _send(child: Child, signum: int) -> None:
    if child.running:
        child.process.send_signal(signum)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _exit_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A pre-exec hook (Linux) so a supervisor killed outright does not leave its children running."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the supervisor died before the line above took effect
            os._exit(1)

    return hook
