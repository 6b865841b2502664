"""Runs the pool on one host: the router and one worker per (device, index), restarted when they die.

It is also the host agent (supervisor/agent.py): registered with the router, it starts and stops
workers when an operator scales a device, and re-reads its config file on a reload (the router's
command, or SIGHUP) to apply the difference live: devices added or removed, workers per device, a
device moved to another model or a model's settings changed (its workers leave, finishing their
requests, then the new ones start). A worker that leaves on the router's word (exit code
EXIT_RETIRED) is not restarted.

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
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import wire
from common.config import (
    ConfigError,
    ModelConfig,
    Placement,
    PoolConfig,
    WorkersConfig,
    load_config,
    model_settings,
    restart_only_changes,
)
from protos import worker_pb2 as pb
from supervisor.agent import AgentLink

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
    # Workers only: their place on the device and the CPU, the model settings they were started with,
    # and whether the router told them to leave (then they are not restarted).
    index: int = 0
    cpu_slot: int = 0
    model: ModelConfig | None = None
    retiring: bool = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def cpu_budget_problem(config: PoolConfig, cores: int) -> str | None:
    """Why the numpy workers would fight over the CPU, or None when they fit (or may oversubscribe)."""
    loads = [(placement.model, placement.workers) for placement in config.placements()]
    return _budget_problem(loads, config.workers.allow_cpu_oversubscription, cores)


def _budget_problem(loads: list[tuple[ModelConfig, int]], oversubscribe: bool, cores: int) -> str | None:
    """`loads`: (model, workers) per device."""
    per_model: dict[str, tuple[int, int]] = {}  # model name -> (workers, threads each)
    for model, workers in loads:
        if model.engine == "numpy" and workers:
            count, _ = per_model.get(model.name, (0, model.threads))
            per_model[model.name] = (count + workers, model.threads)
    threads = sum(count * each for count, each in per_model.values())
    if oversubscribe or threads <= cores:
        return None
    parts = " + ".join(f"{count} numpy workers x {each} threads" for count, each in per_model.values())
    return (
        f"{parts} = {threads} threads, but only {cores} cores are available; lower workers.devices, "
        "workers.per_device or model.threads, or set workers.allow_cpu_oversubscription: true"
    )


@dataclass
class DeviceSlot:
    """One device of this host: the model its workers run, how many it keeps, and their processes."""

    device_id: str  # "0" (a device group: "0,1")
    model: ModelConfig
    target: int
    children: list[Child] = field(default_factory=list)
    retire_asked_at: float = -math.inf  # when the router was last asked to retire some of them


class Supervisor:
    def __init__(self, config_path: Path, config: PoolConfig, remote_router: str | None = None) -> None:
        """`remote_router`: run no local router; the workers connect to this ZeroMQ endpoint instead."""
        self._config = config
        self._config_path = config_path
        self._path = str(config_path.resolve())
        self._remote_router = remote_router
        self._router = (
            None if remote_router else self._child("router", ["-m", "router", "--config", self._path])
        )
        self._slots = {
            placement.device_id: DeviceSlot(placement.device_id, placement.model, placement.workers)
            for placement in config.placements()
        }
        self._signals: list[int] = []
        self._reload_requested = False
        self._cores = len(os.sched_getaffinity(0))
        self._agent = AgentLink(
            remote_router or config.router.worker_endpoint(),
            config.router.heartbeat_interval_s,
            config.router.liveness,
            self._on_command,
            self._on_retiring,
        )

    def _child(self, name: str, args: list[str], reports_restarts: bool = False, **env: str) -> Child:
        return Child(
            name,
            [sys.executable, *args],
            {**os.environ, **env},
            Backoff(self._config.workers),
            reports_restarts=reports_restarts,
        )

    def _new_worker(self, slot: DeviceSlot) -> Child:
        device = slot.device_id
        index = min(set(range(len(slot.children) + 1)) - {child.index for child in slot.children})
        taken = {child.cpu_slot for child in self._workers}
        cpu_slot = min(set(range(len(taken) + 1)) - taken)
        child = self._child(
            f"worker dev{device}-w{index}",
            ["-m", "worker", "--config", self._path, "--dev-id", device, "--index", str(index)]
            + ["--cpu-slot", str(cpu_slot)]
            # With one `model:` the worker serves whatever the file says when it (re)starts, as it always
            # did (an operator may fix the model of a crash-looping worker in place).
            + (["--model", slot.model.name] if self._config.models else [])
            + (["--router", self._remote_router] if self._remote_router else []),
            reports_restarts=True,
            DEV_ID=device,
        )
        child.index, child.cpu_slot, child.model = index, cpu_slot, model_settings(slot.model)
        return child

    @property
    def _workers(self) -> list[Child]:
        return [child for slot in self._slots.values() for child in slot.children]

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda received, _frame: self._signals.append(received))
        signal.signal(signal.SIGHUP, lambda _received, _frame: setattr(self, "_reload_requested", True))
        log.info(
            "starting %s and %d workers",
            "the router" if self._router else "no router",
            sum(slot.target for slot in self._slots.values()),
        )
        try:
            while not self._signals:
                now = time.monotonic()
                if self._router:
                    self._look_after(self._router, now)
                for slot in list(self._slots.values()):
                    self._look_after_slot(slot, now)
                self._agent.report(self._state())
                if self._reload_requested:
                    self._reload_requested = False
                    self._log_reload(self._reload())
                    if self._router and self._router.running:
                        _send(self._router, signal.SIGHUP)  # its own part: the models, the default
                self._agent.poll(_TICK_S)
            log.info("%s: stopping the pool", signal.Signals(self._signals[0]).name)
            self._stop()
        finally:
            self._agent.close()
        log.info("pool stopped")
        return 0

    # ---- the workers of one device

    def _look_after_slot(self, slot: DeviceSlot, now: float) -> None:
        for child in list(slot.children):
            if child.restart_at is None and not child.running and self._retired(child):
                slot.children.remove(child)
                continue
            self._look_after(child, now)
        self._fit(slot, now)
        if slot.target == 0 and not slot.children and slot.device_id not in self._configured_devices():
            del self._slots[slot.device_id]  # removed by a reload, and its workers are gone

    def _retired(self, child: Child) -> bool:
        """A worker that left for good (told to retire): not restarted."""
        assert child.process is not None
        if child.retiring or child.process.returncode == wire.EXIT_RETIRED:
            log.info("%s (pid %d) retired: not restarted", child.name, child.process.pid)
            return True
        return False

    def _fit(self, slot: DeviceSlot, now: float) -> None:
        """Start or retire workers until the device runs `target` workers of its current model.

        Workers of another model (or of the same model with other settings) leave first, and the new
        ones start only once they are gone: a chip holds one bmodel at a time. The router chooses who
        retires (idle workers first) and says so with a Retiring message; asked at most once per
        heartbeat interval, as a worker still loading cannot be chosen until it registers.
        """
        wanted = model_settings(slot.model)
        staying = [child for child in slot.children if not child.retiring]
        stale = [child for child in staying if child.model != wanted]
        current = [child for child in staying if child.model == wanted]
        # A worker waiting for its (re)start, e.g. held back in a crash loop, runs nothing: it goes at once.
        unstarted = [c for c in stale if c.restart_at is not None]
        unstarted += [c for c in current if c.restart_at is not None][: max(0, len(current) - slot.target)]
        for child in unstarted:
            log.info("%s: not started again (scaled down)", child.name)
            slot.children.remove(child)
            staying.remove(child)
        stale = [child for child in staying if child.model != wanted]
        excess = len(stale) + max(0, len(staying) - len(stale) - slot.target)
        if excess:
            if now - slot.retire_asked_at >= self._config.router.heartbeat_interval_s:
                slot.retire_asked_at = now
                self._agent.ask_retire(slot.device_id, excess)
            return
        if any(child.model != wanted for child in slot.children):
            return  # old-model workers are still finishing their requests
        for _ in range(slot.target - len(staying)):
            slot.children.append(self._new_worker(slot))  # started by _look_after on the next tick

    # ---- what the router asks (host agent)

    def _on_command(self, command: pb.AgentCommand) -> pb.AgentReply:
        action = command.WhichOneof("action")
        if action == "set_workers":
            reply = self._set_workers(command.set_workers)
        elif action == "reload":
            reply = self._reload()
            self._log_reload(reply)
        else:
            reply = pb.AgentReply(error=f"unknown command {action!r}")
        reply.command_id = command.command_id
        return reply

    def _set_workers(self, target: pb.DeviceTarget) -> pb.AgentReply:
        slot = self._slots.get(target.device_id)
        if slot is None:
            return pb.AgentReply(error=f"device {target.device_id} is not on this host")
        if target.model != slot.model.name:
            return pb.AgentReply(
                error=f"device {slot.device_id} runs model {slot.model.name}, not {target.model}"
            )
        loads = [
            (other.model, target.workers if other is slot else other.target) for other in self._slots.values()
        ]
        problem = _budget_problem(loads, self._config.workers.allow_cpu_oversubscription, self._cores)
        if problem and target.workers > slot.target:
            return pb.AgentReply(
                error=f"refusing to scale device {slot.device_id} to {target.workers}: {problem}"
            )
        if slot.target != target.workers:
            log.info(
                "device %s: %d -> %d workers of %s",
                slot.device_id,
                slot.target,
                target.workers,
                slot.model.name,
            )
            slot.target = target.workers
        self._fit(slot, time.monotonic())
        self._agent.report(self._state())
        return pb.AgentReply()

    def _on_retiring(self, retiring: pb.Retiring) -> None:
        pids = set(retiring.pids)
        for child in self._workers:
            if child.running and child.process.pid in pids:
                child.retiring = True
                log.info(
                    "%s (pid %d): retiring, it finishes its request and leaves", child.name, child.process.pid
                )

    def _state(self) -> pb.AgentState:
        return pb.AgentState(
            devices=[
                pb.DeviceTarget(device_id=s.device_id, model=s.model.name, workers=s.target)
                for s in self._slots.values()
            ],
            workers=[
                pb.AgentWorker(
                    device_id=slot.device_id,
                    model=child.model.name,
                    pid=child.process.pid,
                    restarts=max(child.starts - 1, 0),
                    retiring=child.retiring,
                )
                for slot in self._slots.values()
                for child in slot.children
                if child.running
            ],
        )

    # ---- reload (SIGHUP, or the router's command)

    def _reload(self) -> pb.AgentReply:
        """Re-read the config file and apply the difference; an invalid file changes nothing."""
        try:
            config = load_config(self._config_path)
        except ConfigError as error:
            return pb.AgentReply(error=f"config {self._config_path}: {error}; nothing was changed")
        problem = cpu_budget_problem(config, self._cores)
        if problem:
            return pb.AgentReply(error=f"config {self._config_path}: {problem}; nothing was changed")
        reply = pb.AgentReply(not_live=restart_only_changes(self._config, config))
        placements = {placement.device_id: placement for placement in config.placements()}
        for device, slot in self._slots.items():
            if device not in placements and slot.target:
                reply.changes.append(f"device {device}: removed, its {slot.target} workers leave")
                slot.target = 0
        for device, placement in placements.items():
            slot = self._slots.get(device)
            if slot is None:
                reply.changes.append(
                    f"device {device}: added, {placement.workers} workers of {placement.model.name}"
                )
                slot = self._slots[device] = DeviceSlot(device, placement.model, placement.workers)
            reply.changes.extend(_slot_changes(slot, placement))
            slot.model, slot.target = placement.model, placement.workers
        self._config = config
        now = time.monotonic()
        for slot in self._slots.values():
            self._fit(slot, now)
        self._agent.report(self._state())
        return reply

    def _log_reload(self, reply: pb.AgentReply) -> None:
        if reply.error:
            log.error("reload refused: %s", reply.error)
            return
        for setting in reply.not_live:
            log.warning("reload: not applied, %s", setting)
        log.info("reload: %s", "; ".join(reply.changes) or "nothing to change")

    def _configured_devices(self) -> set[str]:
        return {placement.device_id for placement in self._config.placements()}

    # ---- processes

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


def _slot_changes(slot: DeviceSlot, placement: Placement) -> list[str]:
    """What a reload changes on one device, in words."""
    device = slot.device_id
    changes = []
    if slot.model.name != placement.model.name:
        changes.append(
            f"device {device}: model {slot.model.name} -> {placement.model.name} (its workers leave first)"
        )
    elif model_settings(slot.model) != model_settings(placement.model):
        changes.append(
            f"device {device}: settings of model {slot.model.name} changed (its workers are replaced)"
        )
    if slot.target != placement.workers:
        changes.append(f"device {device}: {slot.target} -> {placement.workers} workers")
    return changes
