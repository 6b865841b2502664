"""Observability: the Prometheus endpoint scraped over real HTTP, the x-request-id round trip, and
the one log line per call, on an in-process router with emulated workers; then the whole pool as
processes (supervisor, router, paced workers) with the request id followed through both logs."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import inference_pb2 as api
from protos import worker_pb2
from router.calls import MAX_REQUEST_ID_CHARS, REQUEST_ID_KEY
from tests.harness import ProcessSet, inference_stub, start_pool, wait_until, write_config
from tests.harness import free_port as free_port_for_processes
from tests.raw_grpc import raw_unary_call
from tests.router_harness import (
    async_test,
    eventually,
    expect_status,
    free_port,
    read_all,
    request,
    running_router,
    unregistered_worker,
    workers,
)

WAIT_S = 30.0  # an in-process router: seconds at most, unless the machine is very busy
STREAM = "StreamComplete"


@dataclass(frozen=True)
class Scrape:
    """One scrape of the endpoint, parsed by prometheus_client's own parser."""

    samples: list[tuple[str, dict[str, str], float]]  # sample name, labels, value
    types: dict[str, str]  # family name -> counter, gauge, histogram

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(value for sample, have, value in self.matching(name, labels))

    def series(self, name: str, **labels: str) -> list[dict[str, str]]:
        return [have for _, have, _ in self.matching(name, labels)]

    def matching(self, name: str, labels: dict[str, str]) -> Iterator[tuple[str, dict[str, str], float]]:
        for sample in self.samples:
            if sample[0] == name and labels.items() <= sample[1].items():
                yield sample


def fetch(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S) as response:
        assert response.status == 200
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    return Scrape(
        [(sample.name, sample.labels, sample.value) for family in families for sample in family.samples],
        {family.name: family.type for family in families},
    )


async def scrape(port: int) -> Scrape:
    # From another thread, as Prometheus would: the endpoint reads the pool's state on the event loop.
    return await asyncio.to_thread(fetch, port)


async def scrape_until(port: int, condition: Callable[[Scrape], bool], what: str) -> Scrape:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition(result := await scrape(port)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last scrape: {result.samples}")
        await asyncio.sleep(0.05)
    return result


def metrics_address() -> str:
    return f"127.0.0.1:{free_port()}"


def requests_total(scraped: Scrape, method: str, code: str, finish: str) -> float:
    return scraped.value("bm_pool_requests_total", grpc_method=method, grpc_code=code, finish_reason=finish)


def worker_states(scraped: Scrape) -> dict[str, str]:
    """worker id -> the state its bm_pool_worker_state series marks with 1 (each worker exactly one)."""
    states: dict[str, list[str]] = {}
    for _, labels, value in scraped.matching("bm_pool_worker_state", {}):
        states.setdefault(labels["worker_id"], [])
        if value == 1:
            states[labels["worker_id"]].append(labels["state"])
    assert all(len(marked) == 1 for marked in states.values()), states
    return {worker_id: marked[0] for worker_id, marked in states.items()}


def assert_histogram(scraped: Scrape, name: str, count: int) -> None:
    assert scraped.value(f"{name}_count") == count, name
    assert scraped.value(f"{name}_bucket", le="+Inf") == count, name
    buckets = [value for sample, _, value in scraped.matching(f"{name}_bucket", {})]
    assert buckets == sorted(buckets), f"{name}: buckets must be cumulative"


@async_test
async def test_the_endpoint_counts_calls_by_outcome_times_them_and_shows_the_queue():
    async with (
        running_router(metrics_listen=metrics_address()) as router,
        workers(router.endpoint, "w1") as (worker,),
    ):
        port = router.server.metrics_port
        before = await scrape(port)
        assert before.types["bm_pool_requests"] == "counter"
        assert before.types["bm_pool_time_to_first_token_seconds"] == "histogram"
        assert worker_states(before) == {"w1": "idle"}
        assert before.value("bm_pool_worker_registrations_total", device_id="0") == 1

        # OK, three tokens in three chunks.
        served = router.stream("three tokens")
        generate = await worker.next_generate()
        for tokens in (1, 2):
            worker.chunk(generate.request_id, "x", tokens)
            await asyncio.sleep(0.01)
        worker.chunk(generate.request_id, "y", 3, finish=worker_pb2.FINISH_STOP)
        assert (await read_all(served))[-1].finished

        # One running, one waiting for the only worker: the gauges show it.
        cancelled = router.stream("cancel me")
        running = await worker.next_generate()
        queued = await router.queued_stream("wait for it")
        busy = await scrape(port)
        assert busy.value("bm_pool_queue_length") == 1
        assert busy.value("bm_pool_requests_running") == 1
        assert worker_states(busy) == {"w1": "busy"}

        # The running one is cancelled by its client after one token.
        worker.chunk(running.request_id, "a", 1)
        await cancelled.read()
        cancelled.cancel()
        assert (await worker.next("cancel")).request_id == running.request_id
        worker.chunk(running.request_id, "", 1, finish=worker_pb2.FINISH_CANCELLED)

        # Then the queued one runs and hits its token limit.
        waited = await worker.next_generate()
        worker.chunk(waited.request_id, "q", 1, finish=worker_pb2.FINISH_LENGTH)
        assert (await read_all(queued))[-1].finish_reason == api.LENGTH

        # And one invalid request never reaches the queue.
        await expect_status(router.stub.Complete(request("")), grpc.StatusCode.INVALID_ARGUMENT)

        after = await scrape_until(
            port, lambda s: requests_total(s, STREAM, "CANCELLED", "none") == 1, "the cancel counted"
        )
        assert requests_total(after, STREAM, "OK", "stop") == 1
        assert requests_total(after, STREAM, "OK", "length") == 1
        assert requests_total(after, "Complete", "INVALID_ARGUMENT", "none") == 1
        assert after.value("bm_pool_requests_total") == 4
        assert after.value("bm_pool_prompt_tokens_total") == 3 * 7  # the emulated worker's prompt size
        assert after.value("bm_pool_generation_tokens_total") == 3 + 1 + 1
        assert_histogram(after, "bm_pool_queue_wait_seconds", 3)  # one per dispatch
        assert_histogram(after, "bm_pool_time_to_first_token_seconds", 3)
        assert_histogram(after, "bm_pool_inter_token_latency_seconds", 2)  # 3 tokens, 2 gaps
        assert_histogram(after, "bm_pool_request_duration_seconds", 2)  # OK calls only
        assert after.value("bm_pool_queue_length") == 0
        assert after.value("bm_pool_requests_running") == 0
        assert worker_states(after) == {"w1": "idle"}


@async_test
async def test_lost_workers_show_as_lost_until_a_replacement_registers_in_their_place():
    async with (
        running_router(metrics_listen=metrics_address()) as router,
        workers(router.endpoint, "keeper", "hostA-dev0-w0-11", "hostB-dev0-w0-22") as (_, host_a, host_b),
    ):
        port = router.server.metrics_port
        host_a.stop_heartbeats()
        host_b.stop_heartbeats()
        await host_a.next("disconnect")
        await host_b.next("disconnect")
        lost = await scrape(port)
        assert worker_states(lost) == {
            "keeper": "idle",
            "hostA-dev0-w0-11": "lost",
            "hostB-dev0-w0-22": "lost",
        }
        assert lost.value("bm_pool_worker_losses_total", device_id="0") == 2
        assert lost.value("bm_pool_worker_heartbeats_missed_total", device_id="0") >= 2
        assert lost.value("bm_pool_worker_heartbeats_missed_total") == lost.value(
            "bm_pool_worker_heartbeats_missed_total", device_id="0"
        )

        assert lost.value("bm_pool_worker_restarts_total", device_id="0") == 0

        # hostB's worker restarts: a new pid, so a new id; it takes the place of its own lost record.
        # Its supervisor's count reaches it (Hello.restarts); a Hello it repeats counts once only.
        async with unregistered_worker(router.endpoint, "hostB-dev0-w0-33") as restarted:
            await restarted.register(restarts=1)
            await restarted.register(restarts=1)
            replaced = await scrape(port)
        assert worker_states(replaced) == {
            "keeper": "idle",
            "hostA-dev0-w0-11": "lost",
            "hostB-dev0-w0-33": "idle",
        }
        assert replaced.series("bm_pool_worker_state", worker_id="hostB-dev0-w0-22") == []
        assert replaced.value("bm_pool_worker_registrations_total", device_id="0") == 5
        assert replaced.value("bm_pool_worker_restarts_total", device_id="0") == 1


@async_test
async def test_the_request_id_comes_from_the_client_or_the_router_and_reaches_the_worker():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        chosen = router.stub.StreamComplete(request("mine"), metadata=((REQUEST_ID_KEY, "client-7f3a.1"),))
        assert (await chosen.initial_metadata())[REQUEST_ID_KEY] == "client-7f3a.1"
        assert (await worker.next_generate()).request_id == "client-7f3a.1"

        # The same id while the first call is open: kept recognisable, made unique.
        twin = router.stub.StreamComplete(request("twin"), metadata=((REQUEST_ID_KEY, "client-7f3a.1"),))
        twin_id = (await twin.initial_metadata())[REQUEST_ID_KEY]
        assert re.fullmatch(r"client-7f3a\.1-[0-9a-f]{4}", twin_id), twin_id  # as README: abc -> abc-1f2e
        worker.chunk("client-7f3a.1", "done", 1, finish=worker_pb2.FINISH_STOP)
        assert (await read_all(chosen))[-1].finished
        assert (await worker.next_generate()).request_id == twin_id
        worker.chunk(twin_id, "done", 1, finish=worker_pb2.FINISH_STOP)
        assert (await read_all(twin))[-1].finished

        # None sent: the router makes one, for the worker and the client alike. (A unary call's
        # initial metadata reaches a grpc.aio client only with the answer.)
        anonymous = router.stub.Complete(request("anonymous"))
        generated = (await worker.next_generate()).request_id
        assert re.fullmatch(r"[0-9a-f]{16}", generated)
        worker.chunk(generated, "done", 1, finish=worker_pb2.FINISH_STOP)
        assert (await anonymous).output_text == "done"
        assert (await anonymous.initial_metadata())[REQUEST_ID_KEY] == generated


@pytest.mark.parametrize(
    "bad_id", ["two words", "x" * (MAX_REQUEST_ID_CHARS + 1), ""], ids=["space", "too-long", "empty"]
)
@async_test
async def test_an_unusable_request_id_is_refused_and_a_usable_one_is_returned_anyway(bad_id):
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call = router.stub.StreamComplete(request("hi"), metadata=((REQUEST_ID_KEY, bad_id),))
        details = await expect_status(read_all(call), grpc.StatusCode.INVALID_ARGUMENT)
        assert f"{REQUEST_ID_KEY} metadata must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII" in details
        returned = (await call.trailing_metadata())[REQUEST_ID_KEY]
        assert re.fullmatch(r"[0-9a-f]{16}", returned)
        # Sent in the initial metadata too, which grpc.aio may drop when the status follows at once.
        assert (await call.initial_metadata()).get(REQUEST_ID_KEY) in (returned, None)
        assert worker.pending("generate") == 0


@async_test
async def test_a_non_ascii_request_id_is_refused():
    """A grpc client will not send one, but HTTP/2 carries any byte: the router must refuse it too."""
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        headers = [(REQUEST_ID_KEY.encode(), "trace-é".encode())]
        path = "/InferenceService/StreamComplete"
        answer = await asyncio.to_thread(
            raw_unary_call, router.server.grpc_port, path, request("hi"), headers
        )
        assert answer["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]), answer
        assert (
            f"{REQUEST_ID_KEY} metadata must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII"
            in (answer["grpc-message"])
        )
        assert re.fullmatch(r"[0-9a-f]{16}", answer[REQUEST_ID_KEY])
        assert worker.pending("generate") == 0


@async_test
async def test_each_call_ends_with_one_log_line_carrying_its_request_id_and_timings(caplog):
    caplog.set_level(logging.INFO, logger="router.calls")
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call = router.stub.StreamComplete(request("log me"), metadata=((REQUEST_ID_KEY, "trace-42"),))
        generate = await worker.next_generate()
        worker.chunk(generate.request_id, "a", 1)
        worker.chunk(generate.request_id, "b", 2, finish=worker_pb2.FINISH_STOP)
        await read_all(call)
        refused = router.stub.Complete(request(""), metadata=((REQUEST_ID_KEY, "trace-43"),))
        await expect_status(refused, grpc.StatusCode.INVALID_ARGUMENT)
        await eventually(lambda: len(call_lines(caplog)) == 2, "two completion lines")
    served, rejected = call_lines(caplog)
    assert re.fullmatch(
        r"request trace-42: grpc StreamComplete OK, finish stop, worker w1; queue \d+\.\d{3} s, "
        r"first token \d+\.\d{3} s, total \d+\.\d{3} s; prompt 7 tokens, 2 tokens; "
        r"0 prompt tokens from the KV cache",
        served,
    ), served
    assert re.fullmatch(
        r"request trace-43: grpc Complete INVALID_ARGUMENT, not admitted; total \d+\.\d{3} s", rejected
    )


def call_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "router.calls"]


def test_the_pool_serves_metrics_and_logs_the_request_id_in_router_and_worker(tmp_path: Path):
    metrics_port = free_port_for_processes()
    config = write_config(tmp_path, {"router": {"metrics_listen": f"127.0.0.1:{metrics_port}"}})
    with ProcessSet(tmp_path) as procs:
        pool = start_pool(procs, config)
        frames = list(
            inference_stub(pool.channel).StreamComplete(
                request("你好"), metadata=((REQUEST_ID_KEY, "e2e-req-1"),), timeout=30
            )
        )
        assert frames[-1].finished
        worker_id = frames[-1].worker_id
        router_line = pool.supervisor.wait_for_log(
            r"router\.calls: request e2e-req-1: grpc StreamComplete OK[^\n]*"
        )
        assert f"worker {worker_id};" in router_line.group(0)
        pool.supervisor.wait_for_log(rf"worker {re.escape(worker_id)}: request e2e-req-1: started")
        pool.supervisor.wait_for_log(rf"worker {re.escape(worker_id)}: request e2e-req-1: done")

        def counted() -> Scrape | None:
            scraped = fetch(metrics_port)
            return scraped if scraped.value("bm_pool_requests_total") == 1 else None

        scraped = wait_until(counted, "the request counted")
        tokens = frames[-1].token_usage  # one per frame: the paced worker sends a token per chunk
        assert requests_total(scraped, STREAM, "OK", "stop") == 1
        assert scraped.value("bm_pool_generation_tokens_total") == tokens
        assert_histogram(scraped, "bm_pool_inter_token_latency_seconds", tokens - 1)
        assert sorted(worker_states(scraped).values()) == ["idle", "idle"]
        assert scraped.value("bm_pool_worker_registrations_total", device_id="0") == 1
        assert scraped.value("bm_pool_worker_registrations_total", device_id="1") == 1
        assert scraped.value("bm_pool_worker_restarts_total") == 0

        # The supervisor restarts a killed worker and the router counts the restart on its device.
        (victim,) = [p for p in pool.worker_processes() if worker_id.endswith(f"-{p.pid}")]
        device = re.search(r"-dev(\d+)-", worker_id).group(1)
        victim.kill()

        def restart_counted() -> Scrape | None:
            scraped = fetch(metrics_port)
            return scraped if scraped.value("bm_pool_worker_restarts_total") == 1 else None

        restarted = wait_until(restart_counted, "the restart counted")
        assert restarted.value("bm_pool_worker_restarts_total", device_id=device) == 1
        assert restarted.value("bm_pool_worker_registrations_total", device_id=device) == 2
