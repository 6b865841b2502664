"""End to end: `python -m supervisor` starts the router and paced workers; a gRPC client is served."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc

from protos import inference_pb2 as api
from tests.harness import REPO, inference_stub, start_pool, wait_serving, wait_until, write_config

SEED_REQUEST = api.CompletionRequest(
    system_message="You are a helpful assistant.", history=[api.ChatMessage(role=1, content="你好")]
)


def run_chat(*args: str) -> subprocess.CompletedProcess[str]:
    """scripts/chat.py as a user runs it: a file, from another directory."""
    script = REPO / "scripts" / "chat.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd="/", timeout=60
    )


def test_the_pool_streams_the_seed_request_and_stops_cleanly(procs, tmp_path):
    pool = start_pool(procs, write_config(tmp_path))
    frames = list(inference_stub(pool.channel).StreamComplete(SEED_REQUEST, timeout=30))
    assert [frame.finished for frame in frames] == [False] * 7 + [True]
    assert frames[-1].finish_reason == api.STOP
    assert [frame.token_usage for frame in frames] == list(range(1, 9))
    assert "".join(frame.output_text for frame in frames).startswith("lorem ipsum")
    assert {frame.model_id for frame in frames} == {"paced-test"}
    worker_ids = {frame.worker_id for frame in frames}
    assert len(worker_ids) == 1 and worker_ids != {""}

    chat = run_chat("你好", "--addr", pool.config.grpc_address, "--max-new-tokens", "3")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == "lorem ipsum dolor\n"
    assert "[3 tokens" in chat.stderr and "finish LENGTH" in chat.stderr
    refused = run_chat("你好", "--addr", pool.config.grpc_address, "--top-p", "5")
    assert refused.returncode == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "error: INVALID_ARGUMENT: " in refused.stderr

    pool.supervisor.signal(signal.SIGTERM)
    assert pool.supervisor.wait() == 0
    gone = run_chat("你好", "--addr", pool.config.grpc_address, "--timeout", "5")
    assert gone.returncode == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "error: UNAVAILABLE: " in gone.stderr


def test_a_killed_router_is_restarted_and_the_workers_rejoin_it(procs, tmp_path):
    pool = start_pool(procs, write_config(tmp_path))
    workers_before = {process.pid for process in pool.worker_processes()}
    router = pool.router_process()
    assert router is not None
    router.kill()
    pool.supervisor.wait_for_log(rf"router \(pid {router.pid}\) was killed by SIGKILL")
    wait_until(lambda: (new := pool.router_process()) and new.pid != router.pid, "a new router process")
    wait_serving(pool.config.grpc_address, pool.supervisor)
    frames = list(inference_stub(pool.channel).StreamComplete(SEED_REQUEST, timeout=90, wait_for_ready=True))
    assert frames[-1].finished and frames[-1].finish_reason == api.STOP
    assert {process.pid for process in pool.worker_processes()} == workers_before  # not restarted
