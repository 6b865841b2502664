"""Operators reshape a running pool (router/admin.py, router/operations.py, the supervisor as host agent).

Real processes on loopback: a supervisor with its router and paced echo workers, a steady closed-loop
load whose every stream is checked exactly (tests/steady_load.py), and the admin API over gRPC. In
every case no stream is cut, no new request reaches a cordoned or leaving worker once the call has
returned, worker counts reach what was asked, and a worker told to go is not restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import admin_pb2, inference_pb2
from tests.admin_client import Admin, workers_on
from tests.harness import (
    REPO,
    ConfigFile,
    ManagedProcess,
    Pool,
    free_port,
    health_status,
    inference_stub,
    open_channel,
    start_pool,
    wait_until,
    write_config,
)
from tests.security_keys import make_curve_keypair
from tests.steady_load import SteadyLoad, expected_text

TOKENS = 8
QUEUEING_CLIENTS = 5  # closed-loop streams: more than the 4 workers a test runs at most
PACE = {"tokens_per_second": 40.0, "first_token_delay_s": 0.05, "tokens_per_request": TOKENS, "echo": True}


def paced_pool(devices: list[int] | None = None) -> dict[str, Any]:
    return {"model": {"paced": PACE}, "workers": {"devices": devices or [0, 1], "per_device": 1}}


def ids(workers: list) -> set[str]:
    return {worker.worker_id for worker in workers}


def served_by(load: SteadyLoad, workers: set[str], after: float) -> bool:
    return any(call.worker_id in workers for call in load.sent_after(after))


def wait_for_calls(load: SteadyLoad, after: float, count: int, what: str) -> None:
    wait_until(lambda: len(load.sent_after(after)) >= count, f"{count} calls {what}")


def assert_retired(supervisor: ManagedProcess, pids: set[int]) -> None:
    """Each worker exited on the router's word, and its supervisor did not start it again."""
    for pid in pids:
        supervisor.wait_for_log(rf"\(pid {pid}\) retired: not restarted")
        wait_until(lambda pid=pid: not _alive(pid), f"worker pid {pid} to exit")
    assert "restarting in" not in supervisor.log()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def poolctl(admin: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "scripts/poolctl.py", "--admin", admin, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def started(procs, config: ConfigFile, workers: int | None = None) -> tuple[Pool, Admin]:
    pool = start_pool(procs, config, workers)
    admin = Admin(config.admin_address)
    wait_until(lambda: admin.status().agents, "the supervisor registered as a host agent")
    return pool, admin


# ---- scale


def test_scaling_a_device_1_3_1_0_2_under_load_never_cuts_a_stream(procs, tmp_path):
    config = write_config(tmp_path, paced_pool())
    pool, admin = started(procs, config)
    # More clients than workers at any step: requests queue, so a new worker has queued work to take
    # at once (with cache-aware dispatch, an idle worker holding the prompt's prefix goes first).
    with SteadyLoad(config.grpc_address, TOKENS, clients=QUEUEING_CLIENTS) as load:
        wait_for_calls(load, 0.0, 3, "before scaling")
        before = workers_on(admin.status(), "0")
        for target in (3, 1, 0, 2):
            reply = admin.scale("0", target)
            returned = time.monotonic()
            after = workers_on(reply.status, "0")
            assert len(after) == target, reply
            gone = [worker for worker in before if worker.worker_id not in ids(after)]
            new = ids(after) - ids(before)
            for worker_id in new:  # new workers take work at once
                wait_until(lambda w=worker_id, t=returned: served_by(load, {w}, t), f"{worker_id} serving")
            assert_retired(pool.supervisor, {worker.pid for worker in gone})
            wait_for_calls(load, returned, 4, f"after scaling to {target}")
            assert not served_by(load, ids(gone), returned)
            before = after
        assert admin.scale("0", 2).message == "device 0 already has 2 workers"

        # Two operators at once: each gets its answer once its own change took effect, in turn.
        with ThreadPoolExecutor(2) as operators:
            answers = {reply.message for reply in operators.map(lambda n: admin.scale("0", n), (3, 1))}
        chains = {
            3: {"device 0: 2 -> 1 workers", "device 0: 1 -> 3 workers"},
            1: {"device 0: 2 -> 3 workers", "device 0: 3 -> 1 workers"},
        }
        final = len(workers_on(admin.status(), "0"))
        assert answers == chains[final], answers
        load.stop()
    assert load.problems() == []
    assert len(load.served()) >= 20


def test_a_busy_worker_scaled_away_finishes_its_stream_then_leaves(procs, tmp_path):
    slow = {"model": {"paced": {**PACE, "tokens_per_request": 40}}, "workers": {"devices": [0]}}
    config = write_config(tmp_path, slow)
    pool, admin = started(procs, config)
    (worker,) = workers_on(admin.status(), "0")
    prompt = "finish this one"
    stream = inference_stub(pool.channel).StreamComplete(_request(prompt, "paced-test"), timeout=60)
    frames = [next(stream)]  # the worker is busy with it now
    reply = admin.scale("0", 0)  # returns once the worker has left: after the stream's end
    assert workers_on(reply.status, "0") == []
    frames += list(stream)
    assert "".join(frame.output_text for frame in frames) == expected_text(prompt, 40)
    assert [frame.finished for frame in frames].count(True) == 1 and frames[-1].finished
    assert_retired(pool.supervisor, {worker.pid})
    pool.supervisor.wait_for_log(rf"worker {worker.worker_id}: told to retire")


def test_a_second_supervisor_obeys_scale_for_its_own_devices(procs, tmp_path):
    config = write_config(tmp_path, paced_pool([0]))
    pool, admin = started(procs, config)
    raw = dict(config.raw, workers={**config.raw["workers"], "devices": [3]})
    other_path = tmp_path / "host-b.yaml"
    other_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    other = procs.start(
        "supervisor-b", ["-m", "supervisor", "--config", str(other_path), "--router", config.zmq_endpoint]
    )
    wait_until(lambda: len(workers_on(admin.status(), "3")) == 1, "device 3 of the second host registered")
    status = admin.status()
    assert len([agent for agent in status.agents if agent.state == "connected"]) == 2
    owner = next(device.agent_id for device in status.devices if device.device_id == "3")
    assert owner.endswith(f"-agent-{other.pid}")

    assert len(workers_on(admin.scale("3", 2).status, "3")) == 2
    other.wait_for_log(r"started worker dev3-w1 \(pid \d+\)")
    assert "started worker dev3" not in pool.supervisor.log()  # the first host was not asked
    leaving = {w.pid for w in workers_on(admin.status(), "3")}
    staying = {w.pid for w in workers_on(admin.scale("3", 1).status, "3")}
    assert_retired(other, leaving - staying)


def test_the_host_agent_registers_again_with_a_restarted_router(procs, tmp_path):
    config = write_config(tmp_path, paced_pool([0]))
    pool, admin = started(procs, config)
    router = pool.router_process()
    assert router is not None
    router.kill()
    pool.supervisor.wait_for_log(r"router \(pid \d+\) was killed by SIGKILL")

    def agent_back() -> bool:
        try:
            return any(agent.state == "connected" for agent in admin.status().agents)
        except grpc.RpcError:
            return False  # the new router is not listening yet

    wait_until(agent_back, "the host agent registered with the new router")
    assert len(workers_on(admin.scale("0", 2).status, "0")) == 2


def test_the_host_agent_joins_a_curve_secured_worker_link(procs, tmp_path):
    keys = tmp_path / "curve"
    allowed = keys / "allowed"
    allowed.mkdir(parents=True)
    _, router_secret = make_curve_keypair(keys, "router")
    host_public, host_secret = make_curve_keypair(keys, "host")
    host_public.rename(allowed / "host.key")  # the host's workers and its agent share its keypair
    curve = {
        "enabled": True,
        "router_secret_key": str(router_secret),
        "allowed_workers_dir": str(allowed),
        "worker_secret_key": str(host_secret),
        "router_public_key": str(keys / "router.key"),
    }
    config = write_config(tmp_path, {**paced_pool([0]), "security": {"curve": curve}})
    _, admin = started(procs, config)
    assert len(workers_on(admin.scale("0", 2).status, "0")) == 2


# ---- cordon, drain


def test_cordon_uncordon_and_drain_a_device_under_load(procs, tmp_path):
    config = write_config(tmp_path, paced_pool())
    pool, admin = started(procs, config)
    with SteadyLoad(config.grpc_address, TOKENS, clients=3) as load:
        reply = admin.cordon("1")
        cordoned_at = time.monotonic()
        device_1 = workers_on(reply.status, "1")
        assert [worker.state for worker in device_1] == ["cordoned"]
        assert admin.cordon("1").message == "device 1 is already cordoned"
        wait_for_calls(load, cordoned_at, 6, "after the cordon")
        assert not served_by(load, ids(device_1), cordoned_at)

        admin.uncordon("1")
        uncordoned_at = time.monotonic()
        wait_until(lambda: served_by(load, ids(device_1), uncordoned_at), "device 1 serving again")

        drained = poolctl(config.admin_address, "drain", "1")
        drained_at = time.monotonic()
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.splitlines()[-1] == "device 1 drained: no workers left"
        assert_retired(pool.supervisor, {worker.pid for worker in device_1})
        wait_for_calls(load, drained_at, 6, "after the drain")
        assert not served_by(load, ids(device_1), drained_at)

        back = workers_on(admin.scale("1", 1).status, "1")
        back_at = time.monotonic()
        assert len(back) == 1 and back[0].state in ("idle", "busy")
        wait_until(lambda: served_by(load, ids(back), back_at), "device 1 back in service")
        load.stop()
    assert load.problems() == []


def test_poolctl_status_json_and_its_refusals(procs, tmp_path):
    config = write_config(tmp_path, paced_pool([0]))
    started(procs, config)
    status = poolctl(config.admin_address, "--json", "status")
    assert status.returncode == 0, status.stderr
    (worker,) = json.loads(status.stdout)
    assert worker["device_id"] == "0" and worker["model"] == "paced-test" and worker["state"] == "idle"
    assert worker["pid"] > 0 and worker["worker_id"]
    table = poolctl(config.admin_address, "status")
    assert "WORKER" in table.stdout and worker["worker_id"] in table.stdout

    same = poolctl(config.admin_address, "scale", "0", "1")
    assert (same.returncode, same.stdout) == (0, "device 0 already has 1 workers\n")
    reloaded = poolctl(config.admin_address, "reload")
    assert (reloaded.returncode, reloaded.stdout) == (0, "nothing changed\n")
    unknown = poolctl(config.admin_address, "scale", "7", "1")
    assert unknown.returncode == 3
    assert "NOT_FOUND: unknown device '7'; known devices: 0" in unknown.stderr
    no_model = poolctl(config.admin_address, "scale", "--model", "nope", "1")
    assert no_model.returncode == 3 and "unknown model 'nope'; served models: paced-test" in no_model.stderr
    nothing_there = poolctl(f"127.0.0.1:{free_port()}", "--timeout", "5", "status")
    assert nothing_there.returncode == 1 and "UNAVAILABLE" in nothing_there.stderr


def test_the_admin_api_has_its_own_port_with_health_and_reflection(procs, tmp_path):
    config = write_config(tmp_path, paced_pool([0]))
    _, admin = started(procs, config)
    assert health_status(config.admin_address) == health_pb2.HealthCheckResponse.SERVING
    assert admin_services(config.admin_address) == {
        "pool.admin.PoolAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert "pool.admin.PoolAdmin" not in admin_services(config.grpc_address)  # not on the public port
    with pytest.raises(grpc.RpcError) as refused:
        admin.stub.Scale(admin_pb2.ScaleRequest(workers=1), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "scale needs a device_id or a model"


def admin_services(address: str) -> set[str]:
    with open_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    return {service.name for service in answer.list_services_response.service}


# ---- reload


def test_sighup_applies_a_changed_per_device_and_an_invalid_file_changes_nothing(procs, tmp_path):
    config = write_config(tmp_path, paced_pool())
    pool, admin = started(procs, config)
    raw = config.raw
    with SteadyLoad(config.grpc_address, TOKENS, clients=QUEUEING_CLIENTS) as load:
        first = ids(workers_on(admin.status(), "0") + workers_on(admin.status(), "1"))
        _rewrite(config.path, raw, workers={**raw["workers"], "per_device": 2})
        pool.supervisor.signal(signal.SIGHUP)
        pool.supervisor.wait_for_log(r"reload: device 0: 1 -> 2 workers; device 1: 1 -> 2 workers")
        pool.supervisor.wait_for_log(r"router.server: reload: nothing changed for the router")
        wait_until(
            lambda: all(len(workers_on(admin.status(), device)) == 2 for device in ("0", "1")),
            "two workers on each device",
        )
        reloaded_at = time.monotonic()
        status = admin.status()
        new = ids(workers_on(status, "0") + workers_on(status, "1")) - first
        for worker_id in new:
            wait_until(lambda w=worker_id: served_by(load, {w}, reloaded_at), f"{worker_id} serving")

        _rewrite(config.path, raw, workers={**raw["workers"], "per_device": 0})
        with pytest.raises(grpc.RpcError) as refused:
            admin.reload()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "workers.per_device: must be >= 1, got 0; nothing was changed" in refused.value.details()
        pool.supervisor.signal(signal.SIGHUP)
        # the supervisor's own line: the admin call above logged the same refusal already
        pool.supervisor.wait_for_log(
            r"ERROR supervisor: reload refused: .*workers.per_device: must be >= 1, got 0"
        )
        assert [(d.device_id, d.target_workers) for d in admin.status().devices] == [("0", 2), ("1", 2)]
        assert ids(workers_on(admin.status(), "0") + workers_on(admin.status(), "1")) == ids(
            workers_on(status, "0") + workers_on(status, "1")
        )

        _rewrite(
            config.path,
            raw,
            workers={**raw["workers"], "per_device": 2},
            router={**raw["router"], "queue_size": 7},
            model={**raw["model"], "paced": {**PACE, "first_token_delay_s": 0.02}},
        )
        before = ids(workers_on(admin.status(), "0") + workers_on(admin.status(), "1"))
        reply = admin.reload()
        replaced_at = time.monotonic()
        assert any(s.startswith("router.queue_size: 256 -> 7 (needs a restart)") for s in reply.not_live)
        assert any(
            "settings of model paced-test changed (its workers are replaced)" in c for c in reply.changes
        )
        after = ids(workers_on(reply.status, "0") + workers_on(reply.status, "1"))
        assert len(after) == 4 and not after & before  # every worker replaced, none cut
        wait_for_calls(load, replaced_at, 6, "after the replacement")
        assert not served_by(load, before, replaced_at)

        # A device removed from the file: its workers leave (finishing their requests), device 0 serves.
        leaving = workers_on(reply.status, "1")
        _rewrite(config.path, raw, workers={**raw["workers"], "devices": [0], "per_device": 2})
        reply = admin.reload()
        removed_at = time.monotonic()
        assert "device 1: removed, its 2 workers leave" in " ".join(reply.changes)
        assert [device.device_id for device in reply.status.devices] == ["0"]
        assert_retired(pool.supervisor, {worker.pid for worker in leaving})
        wait_for_calls(load, removed_at, 6, "after removing device 1")
        assert not served_by(load, ids(leaving), removed_at)
        load.stop()
    assert load.problems() == []


def _rewrite(path: Path, raw: dict[str, Any], **sections: Any) -> None:
    path.write_text(yaml.safe_dump({**raw, **sections}, sort_keys=False), encoding="utf-8")


# ---- several models


def models_config(directory: Path, models: list[dict[str, Any]]) -> ConfigFile:
    """The fast test settings with a `models:` list in place of `model:`."""
    config = write_config(directory)
    raw = {key: value for key, value in config.raw.items() if key != "model"}
    raw["models"] = models
    config.path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return ConfigFile(config.path, config.grpc_address, config.zmq_endpoint, raw)


def paced_model(name: str, devices: list[int], tokens: int) -> dict[str, Any]:
    pace = {**PACE, "tokens_per_request": tokens}
    return {"name": name, "engine": "paced", "context_size": 512, "devices": devices, "paced": pace}


def test_two_models_at_once_and_moving_a_device_to_the_other_model(procs, tmp_path):
    cores = len(os.sched_getaffinity(0))
    numpy = {"name": "tiny-numpy", "engine": "numpy", "threads": cores, "devices": [9], "per_device": 0}
    models = [paced_model("paced-a", [0], 8), paced_model("paced-b", [1], 5), numpy]
    config = models_config(tmp_path, models)
    pool, admin = started(procs, config, workers=2)
    with (
        SteadyLoad(config.grpc_address, 8, clients=2, model="paced-a", tag="a") as load_a,
        SteadyLoad(config.grpc_address, 5, clients=2, metadata_model="paced-b", tag="b") as load_b,
        SteadyLoad(config.grpc_address, 8, clients=1, tag="default") as load_default,
    ):
        for load in (load_a, load_b, load_default):
            wait_for_calls(load, 0.0, 4, "of each model")
        status = admin.status()
        a_workers, b_workers = ids(workers_on(status, "0")), ids(workers_on(status, "1"))
        with pytest.raises(grpc.RpcError) as unknown:
            inference_stub(pool.channel).Complete(_request("hi", "paced-c"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'paced-c' is not served here; served models: paced-a, paced-b, tiny-numpy" in (
            unknown.value.details()
        )
        with pytest.raises(grpc.RpcError) as budget:
            admin.scale("9", 2)
        assert budget.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"2 numpy workers x {cores} threads = {2 * cores} threads, but only {cores} cores" in (
            budget.value.details()
        )

        moved = [paced_model("paced-a", [0, 1], 8), paced_model("paced-b", [2], 5), numpy]
        raw = {**config.raw, "models": moved}
        config.path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        reply = admin.reload()
        moved_at = time.monotonic()
        assert any("device 1: model paced-b -> paced-a" in change for change in reply.changes), reply
        assert {w.model for w in workers_on(reply.status, "1")} == {"paced-a"}
        assert {w.model for w in workers_on(reply.status, "2")} == {"paced-b"}
        (old_b,) = workers_on(status, "1")
        (new_a,) = workers_on(reply.status, "1")
        assert_retired(pool.supervisor, {old_b.pid})
        log = pool.supervisor.log()  # one chip, one bmodel: the new model's worker started after the old left
        assert log.index(f"(pid {old_b.pid}) retired: not restarted") < log.index(f"(pid {new_a.pid})")
        new_b = ids(workers_on(reply.status, "2"))
        wait_until(lambda: served_by(load_b, new_b, moved_at), "paced-b served on device 2")
        wait_until(
            lambda: served_by(load_a, ids(workers_on(reply.status, "1")), moved_at),
            "device 1 serving paced-a",
        )
        assert not served_by(load_b, b_workers, moved_at)

        scaled = admin.scale_model("paced-a", 2)  # every device of the model
        assert [len(workers_on(scaled.status, device)) for device in ("0", "1", "2")] == [2, 2, 1]
        a_all = a_workers | ids(workers_on(scaled.status, "0") + workers_on(scaled.status, "1"))
        for load in (load_a, load_b, load_default):
            load.stop()
    for load, model in ((load_a, "paced-a"), (load_b, "paced-b"), (load_default, "paced-a")):
        assert load.problems() == []
        assert {call.model_id for call in load.served()} == {model}
    served_b = r"router\.calls: request \S+: grpc StreamComplete OK, model paced-b, finish stop"
    pool.supervisor.wait_for_log(served_b)
    # Each model's requests went to its own workers only: before the move, and after it.
    assert {call.worker_id for call in load_a.served()} <= a_all
    assert {call.worker_id for call in load_b.served()} <= b_workers | new_b


def test_a_scale_up_that_cannot_finish_says_how_far_it_got_and_a_scale_down_stops_it(procs, tmp_path):
    broken = {"name": "broken", "engine": "numpy", "path": str(tmp_path / "missing.gguf"), "devices": [4]}
    config = models_config(tmp_path, [paced_model("paced-a", [0], 8), {**broken, "per_device": 0}])
    raw = {**config.raw, "admin": {**config.raw["admin"], "operation_timeout_s": 3.0}}
    config.path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    pool, admin = started(procs, config, workers=1)
    with pytest.raises(grpc.RpcError) as late:
        admin.scale("4", 1)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert late.value.details() == (
        "not done after 3 s: device 4: 0 of 1 workers registered, 0 still leaving"
    )
    pool.supervisor.wait_for_log(r"cannot load the numpy engine from .*missing.gguf")
    starting = [w for w in admin.status().workers if w.device_id == "4"]
    assert [w.state for w in starting] in ([], ["starting"])  # between restarts, or loading
    assert admin.scale("4", 0).message == "device 4 already has 0 workers"
    pool.supervisor.wait_for_log(r"worker dev4-w0: not started again \(scaled down\)")
    wait_until(lambda: not [w for w in admin.status().workers if w.device_id == "4"], "device 4 empty")


def _request(prompt: str, model: str) -> inference_pb2.CompletionRequest:
    return inference_pb2.CompletionRequest(
        history=[inference_pb2.ChatMessage(role=1, content=prompt)], model=model
    )
