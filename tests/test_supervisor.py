"""The supervisor: real `python -m supervisor` processes starting real workers (and the router)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import psutil

from common.config import ModelConfig, PoolConfig, WorkersConfig, load_config
from supervisor.supervisor import Backoff, cpu_budget_problem
from tests.harness import ProcessSet, free_port, start_pool, wait_until, worker_processes, write_config


def workers_by_device(supervisor) -> dict[str, psutil.Process]:
    """Live worker processes keyed by their --dev-id."""
    found = {}
    for process in worker_processes(supervisor):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                cmdline = process.cmdline()
                found[cmdline[cmdline.index("--dev-id") + 1]] = process
        except psutil.NoSuchProcess:
            pass
    return found


def restart_delays(log: str, name: str) -> list[float]:
    return [float(delay) for delay in re.findall(rf"{name} \(pid \d+\) .*; restarting in ([\d.]+) s", log)]


def start_workers_only(procs: ProcessSet, config_path: Path):
    """A supervisor running workers only, joined to a router endpoint where nothing listens."""
    args = ["-m", "supervisor", "--config", str(config_path), "--router", f"tcp://127.0.0.1:{free_port()}"]
    return procs.start("supervisor", args)


# ---- restart policy


def test_backoff_doubles_up_to_the_max_and_holds_a_crash_loop_there():
    settings = WorkersConfig(
        restart_backoff_s=0.5, restart_backoff_max_s=3.0, stable_after_s=10, crash_loop_after=5
    )
    backoff = Backoff(settings)
    assert [backoff.delay_after(ran_for=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert backoff.crash_looping


def test_backoff_starts_afresh_after_a_stable_run():
    backoff = Backoff(WorkersConfig(restart_backoff_s=0.5, stable_after_s=10, crash_loop_after=2))
    assert backoff.delay_after(ran_for=0.1) == 0.5
    assert backoff.delay_after(ran_for=0.1) == 30.0  # second quick crash: a crash loop, max backoff
    assert backoff.crash_looping
    assert backoff.delay_after(ran_for=60.0) == 0.5
    assert not backoff.crash_looping


def test_cpu_budget_counts_numpy_worker_threads_against_cores():
    numpy = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", {})
    assert cpu_budget_problem(numpy, cores=2) is None
    problem = cpu_budget_problem(numpy, cores=1)
    assert problem is not None and "2 numpy workers x 1 threads = 2 threads, but only 1 cores" in problem
    allowed = PoolConfig(
        model=numpy.model, workers=WorkersConfig(devices=(0, 1), allow_cpu_oversubscription=True)
    )
    assert cpu_budget_problem(allowed, cores=1) is None
    paced = PoolConfig(model=ModelConfig(engine="paced"), workers=WorkersConfig(devices=(0, 1, 2)))
    assert cpu_budget_problem(paced, cores=1) is None


# ---- the process


def test_restarts_a_killed_worker(procs, tmp_path):
    config = write_config(tmp_path)
    supervisor = start_workers_only(procs, config.path)
    first = wait_until(lambda: (w := workers_by_device(supervisor)) and len(w) == 2 and w, "two workers")
    victim = first["0"]
    victim.kill()
    replacement = wait_until(
        lambda: (w := workers_by_device(supervisor).get("0")) and w.pid != victim.pid and w,
        "a new worker for device 0",
    )
    assert workers_by_device(supervisor)["1"].pid == first["1"].pid  # the other one was left alone
    supervisor.wait_for_log(rf"worker dev0-w0 \(pid {victim.pid}\) was killed by SIGKILL after .*restarting")
    supervisor.wait_for_log(rf"started worker dev0-w0 \(pid {replacement.pid}\)")
    assert "--dev-id" in replacement.cmdline() and replacement.environ().get("DEV_ID") == "0"


def test_holds_back_a_worker_that_crashes_at_start_and_reports_it(procs, tmp_path):
    config = write_config(
        tmp_path,
        {
            "model": {"engine": "numpy", "path": str(tmp_path / "no-such-model.gguf")},
            "workers": {
                "devices": [0],
                "restart_backoff_s": 0.05,
                "restart_backoff_max_s": 0.4,
                "crash_loop_after": 3,
                "stable_after_s": 30.0,
            },
        },
    )
    supervisor = start_workers_only(procs, config.path)
    supervisor.wait_for_log(
        r"worker dev0-w0 is crash-looping: it died 3 times in a row .* holding it back 0.4 s"
    )
    wait_until(lambda: len(restart_delays(supervisor.log(), "worker dev0-w0")) >= 5, "five restarts")
    delays = restart_delays(supervisor.log(), "worker dev0-w0")
    assert delays[:5] == [0.05, 0.1, 0.4, 0.4, 0.4]
    log = supervisor.log()
    assert "exited with code 1" in log
    assert "cannot load the numpy engine" in log and "no-such-model.gguf" in log


def test_sigterm_stops_the_router_first_then_the_workers_and_exits_zero(procs, tmp_path):
    pool = start_pool(procs, write_config(tmp_path))
    router = pool.router_process()
    workers = pool.worker_processes()
    assert router is not None and len(workers) == 2
    pool.supervisor.signal(signal.SIGTERM)
    assert pool.supervisor.wait() == 0
    log = pool.supervisor.log()
    assert log.index("stopping the router") < log.index("router stopped") < log.index("stopping 2 workers")
    assert log.count("SIGTERM: stopping once the current request (if any) is done") == 2
    assert "SIGKILL" not in log
    for process in [router, *workers]:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_refuses_more_numpy_threads_than_cores(procs, tmp_path):
    devices = list(range(len(psutil.Process().cpu_affinity()) + 1))
    config = write_config(tmp_path, {"model": {"engine": "numpy"}, "workers": {"devices": devices}})
    supervisor = procs.start("supervisor", ["-m", "supervisor", "--config", str(config.path)])
    assert supervisor.wait() == 2
    assert "refusing to start" in supervisor.log()
    assert "workers.allow_cpu_oversubscription: true" in supervisor.log()
    assert "started" not in supervisor.log()


def test_a_bad_config_fails_naming_the_key(procs, tmp_path):
    config = write_config(tmp_path, {"workers": {"per_device": 0}})
    supervisor = procs.start("supervisor", ["-m", "supervisor", "--config", str(config.path)])
    assert supervisor.wait() == 2
    assert "workers.per_device: must be >= 1, got 0" in supervisor.log()
