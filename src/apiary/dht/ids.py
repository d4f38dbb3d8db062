"""DHT ids: 160-bit integers from SHA-1, compared by XOR distance."""

from __future__ import annotations

import hashlib
import random

ID_BITS = 160
ID_BYTES = ID_BITS // 8
MAX_ID = 1 << ID_BITS


def id_of(data: bytes) -> int:
    """The DHT id of a serialized key or of a peer id's bytes."""
    return int.from_bytes(hashlib.sha1(data).digest(), "big")


def node_id(peer_id: str) -> int:
    """The DHT id of a peer."""
    return id_of(peer_id.encode())


def id_to_bytes(value: int) -> bytes:
    return value.to_bytes(ID_BYTES, "big")


def id_from_bytes(raw: bytes) -> int:
    if len(raw) != ID_BYTES:
        raise ValueError(f"a DHT id has {ID_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def random_id_in(low: int, high: int) -> int:
    """A random id in [low, high)."""
    return random.randrange(low, high)
