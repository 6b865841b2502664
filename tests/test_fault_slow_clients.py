"""Fault: clients that stop reading, and clients that vanish (their process killed mid-stream).

Real pool processes; the clients are separate processes too. A client "stops reading" by being
frozen (SIGSTOP): its socket buffers fill, TCP pushes back, and the router's writes to it stall. It
asks for an answer of a few MiB (the echo of a 40 kB word, 75 times), far beyond what the kernel
and gRPC buffer on the way.
"""

from __future__ import annotations

import hashlib
import re
import signal

import psutil

from tests.fault_clients import (
    assert_complete,
    expected_text,
    registrations,
    run_streams,
    start_echo_pool,
    unique_prompt,
)
from tests.harness import ManagedProcess, ProcessSet, inference_stub, wait_until

ANSWER_TOKENS = 100
BIG_WORD_CHARS = 100_000
# A client process: streams one answer, says when the first frame came, then how the call ended.
CLIENT = """
import hashlib, sys
import grpc
from protos import inference_pb2 as api, inference_pb2_grpc
stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
call = stub.StreamComplete(api.CompletionRequest(history=[api.ChatMessage(role=1, content=sys.argv[2])]))
frames, text = 0, ""
try:
    for frame in call:
        frames, text = frames + 1, text + frame.output_text
        if frames == 1:
            print("first frame from", frame.worker_id, flush=True)
    reason, digest = api.FinishReason.Name(frame.finish_reason), hashlib.sha256(text.encode()).hexdigest()
    print("ended OK", reason, frames, "frames, text sha256", digest, flush=True)
except grpc.RpcError as error:
    print("ended", error.code().name, error.details(), flush=True)
"""


def start_client(procs: ProcessSet, address: str, prompt: str) -> ManagedProcess:
    return procs.start("client", ["-c", CLIENT, address, prompt])


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / (1 << 20)


def test_clients_that_stop_reading_block_no_one_and_lose_nothing(procs, tmp_path):
    pool = start_echo_pool(
        procs,
        tmp_path,
        model={"context_size": 4 * BIG_WORD_CHARS},  # the paced engine counts 4 bytes a token
        tokens_per_second=80.0,
        tokens_per_request=ANSWER_TOKENS,
    )
    stub = inference_stub(pool.channel)
    router = pool.router_process()
    run_streams(stub, [unique_prompt("warm-up") for _ in range(4)])
    rss_before = rss_mib(router)

    # Two clients get their first frame, then freeze: their answers (10 MB each) back up.
    big_words = [unique_prompt("slow") + "x" * BIG_WORD_CHARS for _ in range(2)]
    clients = [start_client(procs, pool.config.grpc_address, word) for word in big_words]
    for client in clients:
        client.wait_for_log("first frame from")
        client.signal(signal.SIGSTOP)
    finished = rf"done, stop; prompt \d{{4,}} tokens, {ANSWER_TOKENS} tokens"  # the big prompts only
    wait_until(
        lambda: len(re.findall(finished, pool.supervisor.log())) == len(big_words),
        "the workers to finish the frozen clients' answers",
    )

    # The workers finished those generations without waiting for the readers, and serve others.
    outcomes = run_streams(stub, [unique_prompt("meanwhile") for _ in range(6)])
    for outcome in outcomes:
        assert_complete(outcome)
    assert set().union(*(outcome.worker_ids for outcome in outcomes)) == set(registrations(pool.supervisor))
    rss_stalled = rss_mib(router)

    # Reading again, each client gets all of its own text, the backlog in fewer, larger frames.
    backlogs = []
    for word, client in zip(big_words, clients, strict=True):
        client.signal(signal.SIGCONT)
        ending = client.wait_for_log(r"ended .*\n").group(0).rstrip("\n")
        digest = hashlib.sha256(expected_text(word, ANSWER_TOKENS).encode()).hexdigest()
        frames = re.fullmatch(rf"ended OK STOP (\d+) frames, text sha256 {digest}", ending)
        assert frames, ending
        backlogs.append(int(frames.group(1)) < ANSWER_TOKENS)
    assert any(backlogs), "no client's answer backed up in the router: the test did not stall it"

    # Memory: what the router holds for stalled clients is bounded by their answers' text (3 x 3 MiB)
    # plus slack, and the same load again adds nothing beyond noise.
    held_mib = len(big_words) * ANSWER_TOKENS * BIG_WORD_CHARS / (1 << 20)
    assert rss_stalled - rss_before < 4 * held_mib + 64, (rss_before, rss_stalled)
    again = [start_client(procs, pool.config.grpc_address, word) for word in big_words]
    for client in again:
        client.wait_for_log(r"ended OK STOP")
    assert rss_mib(router) - rss_stalled < 32, (rss_before, rss_stalled, rss_mib(router))


def test_a_client_that_vanishes_mid_stream_counts_as_a_cancel(procs, tmp_path):
    pace = {"tokens_per_second": 20.0, "tokens_per_request": 400}  # 20 s: only a cancel ends it early
    pool = start_echo_pool(procs, tmp_path, workers={"devices": [0]}, **pace)
    (worker_id,) = registrations(pool.supervisor)
    client = start_client(procs, pool.config.grpc_address, unique_prompt("gone"))
    client.wait_for_log(r"first frame from")
    client.signal(signal.SIGKILL)

    pool.supervisor.wait_for_log(rf"worker {worker_id}: request (\w+): cancel received")
    cancelled = re.search(r"request (\w+): cancel received", pool.supervisor.log()).group(1)
    pool.supervisor.wait_for_log(rf"request {cancelled}: done, cancelled")
    (after,) = run_streams(inference_stub(pool.channel), [unique_prompt("next")], max_new_tokens=4)
    assert_complete(after)
    assert after.worker_ids == {worker_id}
