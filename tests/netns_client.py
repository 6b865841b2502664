"""A gRPC client run inside a test's network namespace (tests/netns.py): TLS, optional client
certificate and API key. Prints one JSON object a line, flushed, so the test follows it live:

    python -m tests.netns_client --target HOST:PORT --ca CA [--cert C --key K] [--api-key KEY] \\
        streams --count N            # N concurrent StreamComplete calls: "first" and "end" events
    ... health --wait-s S            # Check until SERVING (or the call's error), one "health" event
    ... http [--path /v1/models]     # GET on the HTTP front (--target its host:port): one "http" event
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_pb2, inference_pb2_grpc

CALL_TIMEOUT_S = 60.0  # a bound on every call: the client always ends by itself


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def channel(args: argparse.Namespace) -> grpc.aio.Channel:
    key = Path(args.key).read_bytes() if args.key else None
    chain = Path(args.cert).read_bytes() if args.cert else None
    credentials = grpc.ssl_channel_credentials(Path(args.ca).read_bytes(), key, chain)
    return grpc.aio.secure_channel(args.target, credentials)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()


async def one_stream(
    stub: inference_pb2_grpc.InferenceServiceStub, args: argparse.Namespace, index: int
) -> None:
    request = inference_pb2.CompletionRequest(
        history=[inference_pb2.ChatMessage(role=1, content=f"{args.prompt} {index}")]
    )
    call = stub.StreamComplete(request, metadata=metadata(args), timeout=CALL_TIMEOUT_S)
    text, worker, frames = [], "", 0
    try:
        async for frame in call:
            frames += 1
            if frames == 1:
                worker = frame.worker_id
                emit(event="first", index=index, worker=worker)
            text.append(frame.output_text)
        emit(event="end", index=index, status="OK", worker=worker, text="".join(text), frames=frames)
    except grpc.aio.AioRpcError as error:
        emit(event="end", index=index, status=error.code().name, details=error.details(), worker=worker)


async def streams(args: argparse.Namespace) -> None:
    async with channel(args) as open_channel:
        stub = inference_pb2_grpc.InferenceServiceStub(open_channel)
        await asyncio.gather(*(one_stream(stub, args, index) for index in range(args.count)))


async def health(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.wait_s
    async with channel(args) as open_channel:
        stub = health_pb2_grpc.HealthStub(open_channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata(args), timeout=5)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            if status == "SERVING" or time.monotonic() > deadline:
                emit(event="health", status=status)
                return
            await asyncio.sleep(0.2)


async def http_get(args: argparse.Namespace) -> None:
    """GET a path of the HTTP front over TLS (the same CA, client certificate and key)."""
    import ssl

    import aiohttp

    context = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"https://{args.target}{args.path}"
            async with session.get(url, ssl=context, headers=headers) as response:
                emit(event="http", status=response.status, body=await response.json())
    except aiohttp.ClientError as error:
        emit(event="http", status=None, error=type(error).__name__)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns_client")
    parser.add_argument("--target", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--api-key")
    commands = parser.add_subparsers(dest="command", required=True)
    stream_command = commands.add_parser("streams")
    stream_command.add_argument("--count", type=int, default=1)
    stream_command.add_argument("--prompt", default="hello")
    health_command = commands.add_parser("health")
    health_command.add_argument("--wait-s", type=float, default=0.0)
    http_command = commands.add_parser("http")
    http_command.add_argument("--path", default="/v1/models")
    args = parser.parse_args()
    run = {"streams": streams, "health": health, "http": http_get}[args.command]
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
