"""A gRPC call over a bare HTTP/2 connection (the h2 library), for what a grpc client refuses to send:
a grpc client checks metadata values itself (printable ASCII only), a peer on the network need not."""

from __future__ import annotations

import socket
import struct
import urllib.parse

import h2.config
import h2.connection
import h2.events
from google.protobuf.message import Message

from tests.harness import WAIT_S


def raw_unary_call(
    port: int, path: str, message: Message, headers: list[tuple[bytes, bytes]]
) -> dict[str, str]:
    """Send one request on 127.0.0.1:`port` with extra `headers`; the response's headers and trailers
    (grpc-message percent-decoded)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    connection.send_headers(
        1,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ],
    )
    body = message.SerializeToString()
    connection.send_data(1, b"\0" + struct.pack(">I", len(body)) + body, end_stream=True)
    received: dict[str, str] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(connection.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, f"the server closed the connection before the call ended; got {received}"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    received.update((key.decode(), value.decode()) for key, value in event.headers)
                ended = ended or isinstance(event, h2.events.StreamEnded | h2.events.StreamReset)
            sock.sendall(connection.data_to_send())
    if "grpc-message" in received:
        received["grpc-message"] = urllib.parse.unquote(received["grpc-message"])
    return received
