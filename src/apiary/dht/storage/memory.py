"""DHT records in this process's memory: the default backend."""

from __future__ import annotations

from apiary.clock import REAL, Clock
from apiary.dht.storage.base import StoredEntry, ValueWithExpiration, accepts, unexpired


class MemoryStorage:
    """Records in a dict; expired ones are dropped when read and by `purge()`.

    A dictionary's subkeys are updated in place and each key remembers a time before which
    nothing of it expires, so that writing and reading a key of thousands of subkeys does not
    copy or scan them all every time."""

    def __init__(self, clock: Clock = REAL) -> None:
        self.clock = clock
        self._entries: dict[bytes, StoredEntry] = {}
        self._intact_until: dict[bytes, float] = {}  # key: no part of it expires before then

    async def store(self, key: bytes, subkey: bytes | None, value: bytes, expiration: float) -> bool:
        at = self.clock.time()
        current = self._alive(key, at)
        if not accepts(current, subkey, expiration, at):
            return False
        item = ValueWithExpiration(value, expiration)
        if subkey is None or current is None or current.value is not None:
            self._entries[key] = StoredEntry(value=item) if subkey is None else StoredEntry(subkeys={subkey: item})
            self._intact_until[key] = expiration
        else:
            current.subkeys[subkey] = item
            self._intact_until[key] = min(self._intact_until[key], expiration)
        return True

    async def get(self, key: bytes) -> StoredEntry | None:
        return self._alive(key, self.clock.time())

    async def keys(self) -> list[bytes]:
        at = self.clock.time()
        return [key for key in list(self._entries) if self._alive(key, at) is not None]

    async def count(self) -> int:
        return len(await self.keys())

    async def close(self) -> None:
        self._entries.clear()
        self._intact_until.clear()

    def _alive(self, key: bytes, at: float) -> StoredEntry | None:
        entry = self._entries.get(key)
        if entry is None or at < self._intact_until[key]:
            return entry
        alive = unexpired(entry, at)
        if alive is None:
            del self._entries[key], self._intact_until[key]
        else:
            self._entries[key] = alive
            self._intact_until[key] = min(
                [alive.value.expiration] if alive.value is not None else [v.expiration for v in alive.subkeys.values()]
            )
        return alive
