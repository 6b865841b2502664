"""Operate a running pool through its admin API (protos/admin.proto).

    .venv/bin/python scripts/poolctl.py [--admin HOST:PORT] [--json] status
    .venv/bin/python scripts/poolctl.py scale DEVICE N        # or: scale --model NAME N
    .venv/bin/python scripts/poolctl.py cordon DEVICE | uncordon DEVICE | drain DEVICE | reload

A secured admin API (README "Security"): `--api-key-file FILE` (or the key in the environment,
BM_POOL_API_KEY) sends `authorization: Bearer <key>`; `--tls-ca CA.pem` speaks TLS, trusting that
CA; `--tls-cert` and `--tls-key` add a client certificate for mutual TLS; `--tls-server-name` is
the host name in the certificate when --admin names the host otherwise (e.g. through a port-forward).

Each command returns once the pool has done it. Exit 0 on success; otherwise the reason on stderr
and a non-zero code: 2 bad usage, 3 not found (unknown device or model), 4 refused (e.g. the CPU
core budget, an invalid config), 5 not done in time, 6 no or wrong API key, 1 anything else (e.g.
no admin API there, or a TLS handshake that failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `protos` importable

from protos import admin_pb2, admin_pb2_grpc

DEFAULT_ADMIN = "127.0.0.1:18001"
API_KEY_VARIABLE = "BM_POOL_API_KEY"  # as scripts/chat.py: a key in the environment is not in `ps`
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 4,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
    grpc.StatusCode.DEADLINE_EXCEEDED: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
}
WORKER_COLUMNS = (
    ("worker_id", "WORKER"),
    ("host", "HOST"),
    ("device_id", "DEVICE"),
    ("model", "MODEL"),
    ("state", "STATE"),
    ("pid", "PID"),
    ("request_id", "REQUEST"),
    ("requests_served", "REQUESTS"),
    ("tokens_served", "TOKENS"),
    ("uptime_s", "UPTIME"),
    ("restarts", "RESTARTS"),
)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with _channel(args) as channel:
        stub = admin_pb2_grpc.PoolAdminStub(channel)
        try:
            return _run(stub, args)
        except grpc.RpcError as error:
            print(f"poolctl: {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_CODES.get(error.code(), 1)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain text, or TLS trusting --tls-ca (with --tls-cert/--tls-key: a client certificate)."""
    if args.tls_ca is None:
        return grpc.insecure_channel(args.admin)
    ca, cert, key = args.tls_files
    # The name in the certificate, when --admin names the host otherwise (e.g. through a port-forward).
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.admin, grpc.ssl_channel_credentials(ca, key, cert), options)


def _run(stub: admin_pb2_grpc.PoolAdminStub, args: argparse.Namespace) -> int:
    options = {"timeout": args.timeout, "metadata": args.metadata}
    if args.command == "status":
        _show_status(stub.Status(admin_pb2.StatusRequest(), **options), args.json)
    elif args.command == "scale":
        target = {"model": args.model} if args.model else {"device_id": args.device}
        request = admin_pb2.ScaleRequest(workers=args.workers, **target)
        _show_reply(stub.Scale(request, **options), args.json)
    elif args.command in ("cordon", "uncordon"):
        call = stub.Cordon if args.command == "cordon" else stub.Uncordon
        _show_reply(call(admin_pb2.DeviceRequest(device_id=args.device), **options), args.json)
    elif args.command == "drain":
        _follow_drain(stub.Drain(admin_pb2.DeviceRequest(device_id=args.device), **options), args.json)
    elif args.command == "reload":
        reply = stub.Reload(admin_pb2.ReloadRequest(), **options)
        if args.json:
            print(json.dumps(_as_dict(reply), indent=2))
        else:
            if not reply.changes:
                print("nothing changed")
            for change in reply.changes:
                print(f"changed: {change}")
            for setting in reply.not_live:
                print(f"NOT applied (restart needed): {setting}")
    return 0


def _show_status(status: admin_pb2.PoolStatus, as_json: bool) -> None:
    if as_json:
        print(json.dumps([_worker_dict(worker) for worker in status.workers], indent=2))
        return
    print(
        _table(
            ["AGENT", "HOST", "PID", "STATE"], ([a.agent_id, a.host, a.pid, a.state] for a in status.agents)
        )
    )
    print()
    rows = (
        [d.device_id, d.agent_id or "-", d.model, d.target_workers, "yes" if d.cordoned else ""]
        for d in status.devices
    )
    print(_table(["DEVICE", "AGENT", "MODEL", "TARGET", "CORDONED"], rows))
    print()
    rows = ([_cell(worker, name) for name, _ in WORKER_COLUMNS] for worker in status.workers)
    print(_table([title for _, title in WORKER_COLUMNS], rows))
    print()
    default = status.default_model
    rows = (
        [q.model + (" (default)" if q.model == default else ""), q.queued, q.workers] for q in status.queues
    )
    print(_table(["MODEL", "QUEUED", "WORKERS"], rows))


def _show_reply(reply: admin_pb2.OperationReply, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"message": reply.message, "workers": [_worker_dict(w) for w in reply.status.workers]},
                indent=2,
            )
        )
    else:
        print(reply.message)


def _follow_drain(progress: Iterable[admin_pb2.DrainProgress], as_json: bool) -> None:
    """Print each progress frame as it comes (the call ends when the device is idle and empty)."""
    for frame in progress:
        if as_json:
            print(json.dumps(_as_dict(frame)), flush=True)
        else:
            print(frame.message, flush=True)


def _worker_dict(worker: admin_pb2.WorkerStatus) -> dict[str, object]:
    return {name: getattr(worker, name) for name, _ in WORKER_COLUMNS}


def _as_dict(message: object) -> dict[str, object]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _cell(worker: admin_pb2.WorkerStatus, name: str) -> object:
    value = getattr(worker, name)
    if name == "uptime_s":
        return f"{value:.0f}s"
    return value if value != "" else "-"


def _table(headers: list[str], rows: Iterable[list[object]]) -> str:
    lines = [headers, *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="poolctl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"the admin API, host:port (default {DEFAULT_ADMIN})"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the pool (default 600)"
    )
    parser.add_argument(
        "--api-key-file", help=f"a file holding the admin API key (default: ${API_KEY_VARIABLE}, if set)"
    )
    parser.add_argument("--tls-ca", help="speak TLS to the admin API, trusting this PEM CA")
    parser.add_argument("--tls-cert", help="a PEM client certificate (mutual TLS), with --tls-key")
    parser.add_argument("--tls-key", help="its PEM private key")
    parser.add_argument(
        "--tls-server-name", help="the host name in the admin API's certificate, if --admin differs"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="every host agent, device and worker, and the queue per model")
    scale = commands.add_parser(
        "scale", help="start or stop workers on a device (or every device of a model)"
    )
    scale.add_argument("device", nargs="?", help="device id, e.g. 0 or 0,1")
    scale.add_argument("workers", type=int, help="workers to run there")
    scale.add_argument("--model", help="scale every device of this model instead of one device")
    for name, text in (
        ("cordon", "no new work for the device's workers"),
        ("uncordon", "give the device's workers work again"),
        ("drain", "cordon, then stop the device's workers once idle"),
    ):
        commands.add_parser(name, help=text).add_argument("device", help="device id")
    commands.add_parser("reload", help="re-read the config file(s) and apply the difference")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if (args.tls_cert is not None or args.tls_server_name is not None) and args.tls_ca is None:
        parser.error("--tls-cert and --tls-server-name need --tls-ca (the CA of the admin API's certificate)")
    key = _read_api_key(parser, args.api_key_file) if args.api_key_file else os.environ.get(API_KEY_VARIABLE)
    args.metadata = (("authorization", f"Bearer {key}"),) if key else ()
    args.tls_files = tuple(
        _read_pem(parser, flag, path)
        for flag, path in (
            ("--tls-ca", args.tls_ca),
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
        )
    )
    if args.command == "scale":
        if (args.device is None) == (args.model is None):
            parser.error("scale needs either DEVICE or --model NAME")
        if args.workers < 0:
            parser.error("scale: the number of workers must be >= 0")
    return args


def _read_pem(parser: argparse.ArgumentParser, flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        parser.error(f"{flag} {path}: cannot read it: {error.strerror or error}")


def _read_api_key(parser: argparse.ArgumentParser, path: str) -> str:
    """The first key line of `path` ('#' comment and blank lines skipped, as in the router's key file)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--api-key-file {path}: cannot read it: {error}")
    for line in lines:
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    parser.error(f"--api-key-file {path}: holds no key")


if __name__ == "__main__":
    sys.exit(main())
