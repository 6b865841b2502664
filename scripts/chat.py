"""Ask the pool one question and stream the answer to the terminal.

    python scripts/chat.py "你好"
    python scripts/chat.py "What is 2+2?" --addr 127.0.0.1:18000 --temperature 0 --max-new-tokens 64
    BM_POOL_API_KEY=... python scripts/chat.py "你好" --addr pool.example:18000 --ca ca.crt

The answer goes to stdout as it is generated; a summary (tokens, finish reason, worker) to stderr.
Exit status: 0 when the answer finished normally, 1 when it ended with finish_reason ERROR, the gRPC
status code (e.g. 3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE) when the call failed,
130 on Ctrl-C (which cancels the call, freeing the worker).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `protos` importable

from protos import inference_pb2 as api
from protos import inference_pb2_grpc

USER = 1
API_KEY_VARIABLE = "BM_POOL_API_KEY"  # the key is read from the environment: not in ps or shell history


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with _channel(args) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        key = os.environ.get(API_KEY_VARIABLE)
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        call = stub.StreamComplete(_request(args), timeout=args.timeout, metadata=metadata)
        try:
            return _print_stream(call)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return error.code().value[0]
        except KeyboardInterrupt:
            call.cancel()
            print("\ncancelled", file=sys.stderr)
            return 130


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain text, or TLS when --tls or --ca is given (--cert/--key: a client certificate for mTLS)."""
    if not (args.tls or args.ca):
        return grpc.insecure_channel(args.addr)
    ca, cert, key = (Path(path).read_bytes() if path else None for path in (args.ca, args.cert, args.key))
    return grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(ca, key, cert))


def _request(args: argparse.Namespace) -> api.CompletionRequest:
    request = api.CompletionRequest(
        system_message=args.system, history=[api.ChatMessage(role=USER, content=args.prompt)], stop=args.stop
    )
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:  # absent stays absent: the pool's configured default applies
            setattr(request, name, value)
    return request


def _print_stream(call: grpc.Future) -> int:
    last = None
    for frame in call:
        sys.stdout.write(frame.output_text)
        sys.stdout.flush()
        last = frame
    sys.stdout.write("\n")
    if last is None:
        print("error: the stream ended without a frame", file=sys.stderr)
        return 1
    reason = api.FinishReason.Name(last.finish_reason)
    print(
        f"[{last.token_usage} tokens, prompt {last.prompt_tokens}, finish {reason}, model {last.model_id}, "
        f"worker {last.worker_id}]",
        file=sys.stderr,
    )
    return 1 if last.finish_reason == api.ERROR else 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stream one answer from the pool.")
    parser.add_argument("prompt", help="the user's message")
    parser.add_argument("--addr", default="127.0.0.1:18000", help="the router's gRPC address (host:port)")
    parser.add_argument("--system", default="You are a helpful assistant.", help="the system message")
    parser.add_argument("--max-new-tokens", type=_count)
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=_count, help="0 = no top-k cut")
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=_count)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of the call in seconds")
    parser.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    parser.add_argument("--ca", help="TLS, trusting this PEM CA")
    parser.add_argument("--cert", help="a PEM client certificate (mutual TLS), with --key")
    parser.add_argument("--key", help="its PEM private key")
    return parser.parse_args(argv)


def _count(text: str) -> int:
    """An unsigned proto field: a negative number cannot even be sent."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
