"""A rogue peer for the multi-host tests: connects to the router's worker port with a CURVE key the
router does not allow (or with no CURVE at all) and floods: a fresh connection after another, each
queueing Hellos. Then it reports what it saw as JSON: how many messages it received (must be 0),
its handshake outcomes, how many Hellos it queued. Bounded: at most --connections connections
within --seconds, then it exits.

    python -m tests.netns_rogue --endpoint tcp://H:P --router-key router.key [--secret rogue.key_secret]
"""

from __future__ import annotations

import argparse
import json
import time

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from common import wire
from protos import worker_pb2

_SEND_GAP_S = 0.005
_CONNECTION_S = 0.1  # each connection's life: a handshake (refused) and Hellos queued behind it
_EVENTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_CONNECTED: "connected",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns_rogue")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--router-key", required=True)
    parser.add_argument("--secret", help="the rogue's own CURVE secret key file; none = plain text")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=30, help="fresh connections, one after another")
    args = parser.parse_args()
    context = zmq.Context()
    hello = wire.pack(
        worker_pb2.Hello(protocol_version=wire.PROTOCOL_VERSION, worker_id="rogue", model_id="rogue", pid=1)
    )
    report = {"received": 0, "hellos_queued": 0, "connections": 0, **dict.fromkeys(_EVENTS.values(), 0)}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and report["connections"] < args.connections:
        _one_connection(context, args, hello, report, min(deadline, time.monotonic() + _CONNECTION_S))
    print(json.dumps(report), flush=True)
    context.term()


def _one_connection(
    context: zmq.Context, args: argparse.Namespace, hello: bytes, report: dict[str, int], until: float
) -> None:
    """A fresh socket (a fresh handshake) sending Hellos until `until`, counting what comes back."""
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"rogue")
    if args.secret:
        public, secret = zmq.auth.load_certificate(args.secret)
        dealer.curve_publickey, dealer.curve_secretkey = public, secret
        dealer.curve_serverkey = zmq.auth.load_certificate(args.router_key)[0]
    monitor = dealer.get_monitor_socket()
    dealer.connect(args.endpoint)
    report["connections"] += 1
    while time.monotonic() < until:
        try:
            dealer.send(hello, zmq.NOBLOCK)
            report["hellos_queued"] += 1
        except zmq.Again:
            pass
        while dealer.poll(0):
            dealer.recv()
            report["received"] += 1
        while monitor.poll(0):
            event = parse_monitor_message(monitor.recv_multipart())["event"]
            if event in _EVENTS:
                report[_EVENTS[event]] += 1
        time.sleep(_SEND_GAP_S)
    dealer.disable_monitor()
    monitor.close()
    dealer.close()


if __name__ == "__main__":
    main()
