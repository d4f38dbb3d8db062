"""What a DHT node stores, and the rules for merging writes, independent of the backend.

A key (a 20-byte DHT id) holds either one value or a dictionary of subkeys. Every value and
every subkey entry has an absolute expiration time (seconds since the epoch):
- for one key (or one subkey) the write with the latest expiration wins; an equal or older
  expiration is refused;
- subkey entries of a dictionary expire and are replaced separately, so writers merge;
- a plain value replaces a dictionary only if it expires after every entry of it, and a
  subkey entry replaces a plain value only if it expires after it;
- expired values and entries are never returned.
Values are opaque bytes (the node serializes with msgpack before storing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


class StorageUnavailable(RuntimeError):
    """The backend cannot be reached (e.g. Redis is down or the URL is wrong)."""


@dataclass(frozen=True)
class ValueWithExpiration:
    value: bytes
    expiration: float


@dataclass(frozen=True)
class StoredEntry:
    """What a key holds now: a plain value, or a dictionary of subkey entries (never both)."""

    value: ValueWithExpiration | None = None
    subkeys: dict[bytes, ValueWithExpiration] = field(default_factory=dict)

    @property
    def expiration(self) -> float:
        if self.value is not None:
            return self.value.expiration
        return max((entry.expiration for entry in self.subkeys.values()), default=0.0)


class Storage(Protocol):
    """A DHT node's local records. Backends: `MemoryStorage`, `RedisStorage`."""

    async def store(self, key: bytes, subkey: bytes | None, value: bytes, expiration: float) -> bool:
        """Stores by the merge rules above; returns whether the write was accepted."""
        ...

    async def get(self, key: bytes) -> StoredEntry | None:
        """What `key` holds now (expired parts left out), or None."""
        ...

    async def keys(self) -> list[bytes]:
        """Every key holding something unexpired (for republishing to new neighbours)."""
        ...

    async def count(self) -> int:
        """How many keys hold something unexpired."""
        ...

    async def close(self) -> None: ...


def now() -> float:
    return time.time()


def accepts(current: StoredEntry | None, subkey: bytes | None, expiration: float, at: float) -> bool:
    """Whether a write with this subkey and expiration beats what the key holds now."""
    if not expiration > at:  # also refuses NaN
        return False
    if current is None:
        return True
    if subkey is None:
        return expiration > current.expiration
    if current.value is not None:
        return expiration > current.value.expiration
    existing = current.subkeys.get(subkey)
    return existing is None or expiration > existing.expiration


def merged(current: StoredEntry | None, subkey: bytes | None, item: ValueWithExpiration) -> StoredEntry:
    """What a key holds after an accepted write (see `accepts`)."""
    if subkey is None:
        return StoredEntry(value=item)
    subkeys = dict(current.subkeys) if current is not None and current.value is None else {}
    subkeys[subkey] = item
    return StoredEntry(subkeys=subkeys)


def unexpired(entry: StoredEntry, at: float) -> StoredEntry | None:
    """The entry without its expired parts, or None if nothing is left."""
    if entry.value is not None:
        return entry if entry.value.expiration > at else None
    alive = {subkey: v for subkey, v in entry.subkeys.items() if v.expiration > at}
    return StoredEntry(subkeys=alive) if alive else None
