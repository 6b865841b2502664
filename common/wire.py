"""Encoding of the internal router <-> worker messages (protos/worker.proto) on ZeroMQ frames.

Each ZeroMQ message carries exactly one serialized `Envelope`; its `body` oneof names the type,
so both sides dispatch on `kind` without guessing. Never pickle: a peer on the port may be hostile.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

from protos import worker_pb2 as pb

# 2: Hello.device_group; 3: Generate.raw_prompt; 4: host agents, Retire, models;
# 5: KV reuse (held_prefix, cached_prompt_tokens, session_id)
PROTOCOL_VERSION = 5
# Larger frames are refused unread (ZMQ_MAXMSGSIZE): a Generate carries at most the validated
# request (router max_request_bytes) plus a little framing.
MAX_FRAME_BYTES = 4 << 20
# A worker that obeyed a Retire exits with this code; its supervisor does not restart it.
EXIT_RETIRED = 75


class WireError(ValueError):
    """A frame that is not a valid Envelope of a known type."""


def pack(message: Message) -> bytes:
    """Wrap one of the worker.proto message types in an Envelope and serialize it."""
    envelope = pb.Envelope()
    kind = _KIND_BY_TYPE.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not an Envelope body type")
    getattr(envelope, kind).CopyFrom(message)
    return envelope.SerializeToString()


def unpack(frame: bytes) -> tuple[str, Message]:
    """Return (kind, message), kind being the Envelope field name ("hello", "chunk", ...)."""
    envelope = pb.Envelope()
    try:
        envelope.ParseFromString(frame)
    except DecodeError as error:
        raise WireError(f"undecodable frame of {len(frame)} bytes") from error
    kind = envelope.WhichOneof("body")
    if kind is None:
        raise WireError("envelope without a body")
    return kind, getattr(envelope, kind)


_BODY_FIELDS = pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields
_KIND_BY_TYPE: dict[type[Message], str] = {
    type(getattr(pb.Envelope(), field.name)): field.name for field in _BODY_FIELDS
}
