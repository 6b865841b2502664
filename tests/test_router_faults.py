"""Router fault handling: cancels, lost workers, stale chunks, bad peers, re-registration.
Real router, real gRPC clients, emulated workers on real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc
import zmq
import zmq.asyncio

from common import wire
from protos import inference_pb2, worker_pb2
from tests.router_harness import (
    EmulatedWorker,
    async_test,
    background,
    eventually,
    expect_status,
    read_all,
    request,
    running_router,
    unregistered_worker,
    workers,
)


async def serve_the_rerun(
    worker: EmulatedWorker,
    generate: worker_pb2.Generate,
    call: grpc.aio.UnaryStreamCall,
    text: str,
) -> list[inference_pb2.Completion]:
    """`worker` is given the request of `generate` again and answers `text`; the frames of the call."""
    again = await worker.next_generate()
    assert again.request_id == generate.request_id
    await worker.serve(again, [text])
    return await read_all(call)


@async_test
async def test_a_client_cancel_reaches_the_worker_which_is_then_free_again():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "long story")
        worker.chunk(generate.request_id, "Once", 1)
        assert (await call.read()).output_text == "Once"
        call.cancel()
        cancel = await worker.next("cancel")
        assert cancel.request_id == generate.request_id
        assert router.server.snapshot().running == 1  # busy until the worker confirms
        worker.chunk(generate.request_id, "", 1, finish=worker_pb2.FINISH_CANCELLED)
        await eventually(lambda: router.server.snapshot().workers_idle == 1, "the worker idle again")
        next_call, next_generate = await router.started_stream(worker, "next")
        assert next_generate.history[0].content == "next"
        await worker.serve(next_generate, ["fine"])
        assert "".join(frame.output_text for frame in await read_all(next_call)) == "fine"
        assert worker.overlaps == []


@async_test
async def test_a_complete_call_whose_deadline_passes_on_a_worker_cancels_the_generation():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call = router.stub.Complete(request("slow"), timeout=0.5)
        generate = await worker.next_generate()
        worker.chunk(generate.request_id, "partial", 1)
        await expect_status(call, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert (await worker.next("cancel")).request_id == generate.request_id
        worker.chunk(generate.request_id, "", 1, finish=worker_pb2.FINISH_CANCELLED)
        await eventually(lambda: router.server.snapshot().workers_idle == 1, "the worker idle again")


@async_test
async def test_a_call_cancelled_while_queued_never_reaches_a_worker():
    async with running_router() as router:
        call = await router.queued_stream("never mind")
        call.cancel()
        await eventually(lambda: router.server.snapshot().open_calls == 0, "the call closed")
        assert router.server.snapshot().queued == 0
        await router.assert_the_next_request_reaches_a_worker()


@async_test
async def test_a_worker_that_never_confirms_a_cancel_is_dropped_as_lost():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "x")
        call.cancel()
        await worker.next("cancel")
        disconnect = await worker.next("disconnect")  # heartbeats go on, but no final chunk
        assert f"did not confirm the cancel of request {generate.request_id}" in disconnect.reason
        snapshot = router.server.snapshot()
        assert (snapshot.workers_lost, snapshot.running, snapshot.workers_idle) == (1, 0, 0)


@async_test
async def test_a_request_on_a_lost_worker_that_sent_nothing_runs_again_elsewhere():
    async with running_router() as router, workers(router.endpoint, "w1") as (w1,):
        call, generate = await router.started_stream(w1, "important")
        async with workers(router.endpoint, "w2") as (w2,):
            w1.stop_heartbeats()
            assert "no message for" in (await w1.next("disconnect")).reason
            again = await w2.next_generate()
            assert again.request_id == generate.request_id and again.history[0].content == "important"
            w1.chunk(generate.request_id, "stale text from the lost worker", 1)
            assert "not registered" in (await w1.next("disconnect")).reason
            await w2.serve(again, ["fresh ", "answer"])
            frames = await read_all(call)
    assert "".join(frame.output_text for frame in frames) == "fresh answer"
    assert {frame.worker_id for frame in frames} == {"w2"}


@async_test
async def test_a_request_run_again_goes_ahead_of_the_requests_already_waiting():
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as (w1, w2):
        first, generate_1 = await router.started_stream(w1, "first")
        second, generate_2 = await router.started_stream(w2, "second")
        waiting = await router.queued_stream("waiting")
        w1.stop_heartbeats()
        await w1.next("disconnect")
        await eventually(
            lambda: router.server.snapshot().queued == 2, "the lost worker's request queued again"
        )
        await w2.serve(generate_2, ["done"])
        next_up = await w2.next_generate()
        assert next_up.request_id == generate_1.request_id, (
            "the re-dispatched request waited behind the queue"
        )
        await w2.serve(next_up, ["first again"])
        assert "".join(frame.output_text for frame in await read_all(first)) == "first again"
        assert [frame.output_text for frame in await read_all(second)] == ["done"]
        assert (await w2.next_generate()).history[0].content == "waiting"
        waiting.cancel()


@async_test
async def test_a_request_on_a_lost_worker_that_already_sent_frames_fails_with_unavailable():
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as (w1, w2):
        call, generate = await router.started_stream(w1, "x")
        w1.chunk(generate.request_id, "partial", 1)
        assert (await call.read()).output_text == "partial"
        w1.stop_heartbeats()
        details = await expect_status(read_all(call), grpc.StatusCode.UNAVAILABLE)
        assert "worker w1 was lost" in details and "no message for" in details
        assert w2.pending("generate") == 0
        assert router.server.snapshot().workers_idle == 1


@async_test
async def test_a_request_is_run_again_only_once():
    async with running_router() as router:
        call = router.stream("unlucky")
        async with workers(router.endpoint, "w1") as (w1,):
            await w1.next_generate()
            w1.stop_heartbeats()
            await w1.next("disconnect")
        async with workers(router.endpoint, "w2") as (w2,):
            await w2.next_generate()
            w2.stop_heartbeats()
            details = await expect_status(read_all(call), grpc.StatusCode.UNAVAILABLE)
    assert "worker w2 was lost" in details


@async_test
async def test_a_worker_that_disconnects_is_lost_and_its_request_runs_again():
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as (w1, w2):
        call, generate = await router.started_stream(w1, "x")
        w1.send(worker_pb2.Disconnect(reason="shutting down"))
        assert (await serve_the_rerun(w2, generate, call, "ok"))[-1].worker_id == "w2"
        assert router.server.snapshot().workers_lost == 1


@async_test
async def test_a_generation_the_worker_cancelled_on_its_own_runs_again(caplog):
    caplog.set_level(logging.WARNING, logger="router.scheduler")
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "x")
        worker.chunk(generate.request_id, "", 0, finish=worker_pb2.FINISH_CANCELLED)
        frames = await serve_the_rerun(worker, generate, call, "second try")
        assert "".join(frame.output_text for frame in frames) == "second try"
    assert [record.getMessage() for record in caplog.records if record.name == "router.scheduler"] == [
        f"request {generate.request_id} will run again: worker w1 cancelled the generation on its own"
    ]


@async_test
async def test_a_generation_cancelled_by_its_worker_twice_fails_with_unavailable_naming_the_cause():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "x")
        worker.chunk(generate.request_id, "", 0, finish=worker_pb2.FINISH_CANCELLED)
        again = await worker.next_generate()
        worker.chunk(again.request_id, "", 0, finish=worker_pb2.FINISH_CANCELLED)
        details = await expect_status(read_all(call), grpc.StatusCode.UNAVAILABLE)
    assert details == "worker w1 cancelled the generation on its own while serving this request"


@async_test
async def test_chunks_for_requests_a_worker_is_not_running_are_dropped(caplog):
    caplog.set_level(logging.WARNING, logger="router.scheduler")
    async with running_router() as router, workers(router.endpoint, "w1", "w2") as (w1, w2):
        call_1, generate_1 = await router.started_stream(w1, "one")
        call_2, generate_2 = await router.started_stream(w2, "two")
        w1.chunk(generate_2.request_id, "INTRUDER", 1)  # another worker's request
        w1.chunk("no-such-request", "GHOST", 1)
        w1.chunk(generate_1.request_id, "mine", 1)
        # Same socket, same order: once "mine" arrived, the two bad chunks were handled before it.
        assert (await call_1.read()).output_text == "mine"
        w1.chunk(generate_1.request_id, "", 2, finish=worker_pb2.FINISH_STOP)
        rest_1 = await read_all(call_1)
        w1.chunk(generate_1.request_id, "LATE", 3)  # after its final chunk: stale
        w2.chunk(generate_2.request_id, "theirs", 1, finish=worker_pb2.FINISH_STOP)
        frames_2 = await read_all(call_2)
        call_3 = router.stream("three")  # w1 has been idle longer than w2: it gets this one
        generate_3 = await w1.next_generate()
        await w1.serve(generate_3, ["clean"])
        frames_3 = await read_all(call_3)
    assert "".join(frame.output_text for frame in rest_1) == ""
    assert "".join(frame.output_text for frame in frames_2) == "theirs"
    assert "".join(frame.output_text for frame in frames_3) == "clean"
    dropped = [record.getMessage() for record in caplog.records if record.name == "router.scheduler"]
    assert dropped == [
        f"dropped a chunk for request '{generate_2.request_id}' from worker w1: "
        f"it is running '{generate_1.request_id}'",
        f"dropped a chunk for request 'no-such-request' from worker w1: "
        f"it is running '{generate_1.request_id}'",
        f"dropped a chunk for request '{generate_1.request_id}' from worker w1: it is running nothing",
    ]


@async_test
async def test_garbage_on_the_worker_socket_is_dropped_and_the_router_keeps_serving():
    async with running_router() as router:
        async with unregistered_worker(router.endpoint, "vandal") as vandal:
            vandal.send_raw(b"\xff\x00garbage")
            vandal.send_raw(b"")
            vandal.send_raw(b"two", b"frames")
            vandal.send_raw(worker_pb2.Chunk(request_id="x").SerializeToString())  # not an Envelope
            vandal.send(worker_pb2.Generate(request_id="y"))  # a router-to-worker type, unregistered
            assert "not registered" in (await vandal.next("disconnect")).reason
            await vandal.register()
            vandal.send(worker_pb2.Welcome())  # a type workers never send, from a registered peer
            vandal.send(worker_pb2.Disconnect(reason="done vandalising"))
            await eventually(lambda: router.server.snapshot().workers_lost == 1, "the vandal gone")

        oversized = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        oversized.setsockopt(zmq.LINGER, 0)
        oversized.connect(router.endpoint)
        await oversized.send(b"\x00" * (wire.MAX_FRAME_BYTES + 1))
        oversized.close()

        async with workers(router.endpoint, "w1") as (worker,):
            call = router.stream("still there?")
            await worker.serve(await worker.next_generate(), ["yes"])
            assert "".join(frame.output_text for frame in await read_all(call)) == "yes"


@async_test
async def test_an_unregistered_peer_is_told_to_register():
    async with running_router() as router, unregistered_worker(router.endpoint, "stranger") as stranger:
        stranger.send(worker_pb2.Heartbeat())
        assert "not registered" in (await stranger.next("disconnect")).reason


@async_test
async def test_a_flooding_unregistered_peer_gets_one_disconnect_per_heartbeat_interval():
    async with (
        running_router(heartbeat_interval_s=0.5) as router,
        unregistered_worker(router.endpoint, "flooder") as flooder,
    ):
        for _ in range(200):
            flooder.send(worker_pb2.Heartbeat())
        await flooder.next("disconnect")
        await asyncio.sleep(0.2)  # well inside the interval: the rest of the flood goes unanswered
        assert flooder.pending("disconnect") == 0
        await asyncio.sleep(0.4)  # a new interval: the peer is told again
        flooder.send(worker_pb2.Heartbeat())
        assert "not registered" in (await flooder.next("disconnect")).reason


@async_test
async def test_a_hello_with_another_protocol_version_is_refused():
    async with running_router() as router, unregistered_worker(router.endpoint, "old") as old:
        old.hello(protocol_version=wire.PROTOCOL_VERSION + 1)
        reason = (await old.next("disconnect")).reason
        assert f"protocol version {wire.PROTOCOL_VERSION + 1} is not supported" in reason
        assert old.pending("welcome") == 0
        assert router.server.snapshot().workers_idle == 0


@async_test
async def test_a_hello_without_a_worker_id_is_refused():
    async with running_router() as router, unregistered_worker(router.endpoint, "") as anonymous:
        anonymous.hello()
        assert "without a worker_id" in (await anonymous.next("disconnect")).reason
        assert router.server.snapshot().workers_idle == 0


@async_test
async def test_a_restarted_worker_replaces_its_predecessor_and_fails_its_started_request():
    async with running_router() as router, workers(router.endpoint, "w1") as (old,):
        call, generate = await router.started_stream(old, "x")
        old.chunk(generate.request_id, "half", 1)
        assert (await call.read()).output_text == "half"
        async with workers(router.endpoint, "w1") as (new,):  # same worker id, new process
            details = await expect_status(read_all(call), grpc.StatusCode.UNAVAILABLE)
            assert "worker w1 was lost" in details and "same worker id" in details
            snapshot = router.server.snapshot()
            assert (snapshot.workers_idle, snapshot.workers_busy) == (1, 0)
            old.chunk(generate.request_id, "ghost", 2)  # the old peer is no longer registered
            assert "not registered" in (await old.next("disconnect")).reason
            next_call = router.stream("y")
            await new.serve(await new.next_generate(), ["from the new one"])
            assert "".join(frame.output_text for frame in await read_all(next_call)) == "from the new one"


@async_test
async def test_a_worker_that_says_hello_again_on_the_same_socket_gets_its_unstarted_request_back():
    async with running_router() as router, workers(router.endpoint, "w1") as (worker,):
        call, generate = await router.started_stream(worker, "x")
        worker.current = None  # it forgot everything, as after a reconnect
        await worker.register()
        assert (await serve_the_rerun(worker, generate, call, "done"))[-1].finished
        assert worker.pending("disconnect") == 0  # re-registering must not be answered with a Disconnect


@async_test
async def test_a_cancel_storm_leaves_no_request_behind():
    rng = random.Random(1234)
    async with running_router() as router, workers(router.endpoint, "w1", "w2", "w3") as pool:

        async def serve_until_cancelled(worker: EmulatedWorker) -> None:
            while True:
                generate = await worker.next_generate()
                tokens = 0
                while worker.pending("cancel") == 0:
                    tokens += 1
                    worker.chunk(generate.request_id, "x", tokens)
                    await asyncio.sleep(0.001)
                cancel = await worker.next("cancel")
                assert cancel.request_id == generate.request_id
                worker.chunk(generate.request_id, "", tokens, finish=worker_pb2.FINISH_CANCELLED)

        async def client() -> None:
            call = router.stream("storm")
            for _ in range(rng.randrange(4)):
                await call.read()
            call.cancel()

        async with background(*(serve_until_cancelled(worker) for worker in pool)):
            await asyncio.gather(*(client() for _ in range(40)))
            await eventually(
                lambda: (
                    router.server.snapshot().workers_idle == 3 and router.server.snapshot().open_calls == 0
                ),
                "every worker idle and every call closed",
            )
        snapshot = router.server.snapshot()
        assert (snapshot.queued, snapshot.running, snapshot.workers_lost) == (0, 0, 0)
        assert all(worker.overlaps == [] for worker in pool)
