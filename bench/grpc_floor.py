"""The floor under the router's added latency: a bare grpc.aio server that makes paced frames itself.

No ZeroMQ, no queue, no workers: each call sleeps to the next token's deadline, stamps create_time
and yields the frame. What the load generator then measures (receive - create_time) is the cost of
one Python gRPC hop plus the client's own stack, which any router written with grpc.aio pays too.
With --http-listen the same process also serves the HTTP floor: a bare aiohttp server streaming
the same paced tokens as the router's SSE chunks (bench/http_vs_grpc.py).

    python -m bench.grpc_floor --listen 127.0.0.1:18900 --tokens-per-second 10 --first-token-delay 0.7
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from aiohttp import web

from bench.pool import REPO_ROOT, free_port, pin_process
from common.config import EVENT_LOOPS, PacedConfig
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import worker_pb2
from router import event_loop
from router.http.openai_requests import Endpoint
from router.http.openai_responses import DONE_EVENT, ResponseWriter

START_TIMEOUT_S = 30.0


class PacedServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, pace: PacedConfig) -> None:
        self.pace = pace

    async def StreamComplete(
        self, request: pb.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Completion]:
        loop = asyncio.get_running_loop()
        first_at = loop.time() + self.pace.first_token_delay_s
        count = self.pace.tokens_per_request
        rate = self.pace.tokens_per_second
        period = 1 / rate if rate else 0.0  # 0 = as fast as possible, as in the paced engine
        for index in range(count):
            await asyncio.sleep(max(0.0, first_at + index * period - loop.time()))
            finished = index == count - 1
            frame = pb.Completion(
                model_id="grpc-floor",
                output_text=" word",
                token_usage=index + 1,
                finished=finished,
                finish_reason=pb.STOP if finished else pb.UNKNOWN,
                worker_id="grpc-floor",
            )
            frame.create_time.FromNanoseconds(time.time_ns())
            yield frame


async def paced_sse(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions: the paced tokens as the router's SSE chunks, without the router."""
    pace: PacedConfig = request.app["pace"]
    await request.read()
    loop = asyncio.get_running_loop()
    first_at = loop.time() + pace.first_token_delay_s
    period = 1 / pace.tokens_per_second if pace.tokens_per_second else 0.0
    writer = ResponseWriter(Endpoint.CHAT, "floor", "http-floor", include_usage=False)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(writer.role_event(0))
    for index in range(pace.tokens_per_request):
        await asyncio.sleep(max(0.0, first_at + index * period - loop.time()))
        await response.write(writer.text_event(0, "word" if index == 0 else " word"))
    await response.write(writer.finish_event(0, worker_pb2.FINISH_STOP))
    await response.write(DONE_EVENT)
    return response


async def serve(listen: str, pace: PacedConfig, http_listen: str | None = None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(PacedServicer(pace), server)
    server.add_insecure_port(listen)
    await server.start()
    runner = None
    if http_listen is not None:
        app = web.Application()
        app["pace"] = pace
        app.router.add_post("/v1/chat/completions", paced_sse)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = http_listen.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(grace=0)
    if runner is not None:
        await runner.cleanup()


class FloorServer:
    """`with FloorServer(pace, cpus, scratch) as floor:` the server as a subprocess at floor.addr."""

    def __init__(
        self, pace: PacedConfig, cpus: frozenset[int] | None, scratch: Path, event_loop: str = "uvloop"
    ) -> None:
        self.pace = pace
        self.event_loop = event_loop
        self.cpus = cpus
        self.scratch = scratch
        self.addr = f"127.0.0.1:{free_port()}"
        self.http_url = f"http://127.0.0.1:{free_port()}"  # the HTTP floor beside it
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> FloorServer:
        self.scratch.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "bench.grpc_floor", "--listen", self.addr,
            "--tokens-per-second", str(self.pace.tokens_per_second),
            "--first-token-delay", str(self.pace.first_token_delay_s),
            "--tokens", str(self.pace.tokens_per_request), "--event-loop", self.event_loop,
            "--http-listen", self.http_url.removeprefix("http://"),
        ]  # fmt: skip
        with (self.scratch / "grpc_floor.log").open("wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        if self.cpus:
            pin_process(self.process.pid, self.cpus)
        self._wait_until_serving()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _wait_until_serving(self) -> None:
        with grpc.insecure_channel(self.addr) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the gRPC floor server did not listen on {self.addr}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--tokens-per-second", type=float, default=10.0)
    parser.add_argument("--first-token-delay", type=float, default=0.7)
    parser.add_argument("--tokens", type=int, default=64, help="frames per call")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="uvloop", help="as router.event_loop")
    parser.add_argument("--http-listen", help="host:port of the HTTP floor (default: none)")
    args = parser.parse_args(argv)
    pace = PacedConfig(args.tokens_per_second, args.first_token_delay, args.tokens)
    event_loop.run(serve(args.listen, pace, args.http_listen), args.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
