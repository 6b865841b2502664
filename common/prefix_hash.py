"""Hashes of a conversation's turn prefixes, computed the same way by the router and the workers.

The router does not tokenize, so cache-aware dispatch matches conversations by their text: a
worker reports the hashes of the conversation prefixes whose keys/values its KV cache holds, the
router hashes each request's prefixes the same way and prefers the idle worker holding the longest
one. Depth k covers the system message and the first k turns; hashes are chained, so equal hashes
at depth k mean equal system messages and equal first k turns (up to 64-bit collisions, which only
cost a worse choice of worker: the worker itself compares token ids before reusing anything).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Protocol


class TurnLike(Protocol):
    role: int
    content: str


def conversation_hashes(system_message: str, turns: Iterable[TurnLike]) -> list[int]:
    """[depth 0 (the system message alone), depth 1 (+ the first turn), ...]: one 64-bit hash each."""
    digest = _hash(b"system\0" + system_message.encode())
    hashes = [int.from_bytes(digest, "little")]
    for turn in turns:
        digest = _hash(digest + turn.role.to_bytes(4, "little", signed=True) + turn.content.encode())
        hashes.append(int.from_bytes(digest, "little"))
    return hashes


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()
