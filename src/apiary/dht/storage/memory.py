"""DHT records in this process's memory: the default backend."""

from __future__ import annotations

from apiary.dht.storage.base import StoredEntry, ValueWithExpiration, accepts, now, unexpired


class MemoryStorage:
    """Records in a dict; expired ones are dropped when read and by `purge()`."""

    def __init__(self) -> None:
        self._entries: dict[bytes, StoredEntry] = {}

    async def store(self, key: bytes, subkey: bytes | None, value: bytes, expiration: float) -> bool:
        at = now()
        current = self._alive(key, at)
        if not accepts(current, subkey, expiration, at):
            return False
        item = ValueWithExpiration(value, expiration)
        if subkey is None:
            self._entries[key] = StoredEntry(value=item)
        else:
            subkeys = dict(current.subkeys) if current is not None and current.value is None else {}
            subkeys[subkey] = item
            self._entries[key] = StoredEntry(subkeys=subkeys)
        return True

    async def get(self, key: bytes) -> StoredEntry | None:
        return self._alive(key, now())

    async def keys(self) -> list[bytes]:
        at = now()
        return [key for key in list(self._entries) if self._alive(key, at) is not None]

    async def count(self) -> int:
        return len(await self.keys())

    async def close(self) -> None:
        self._entries.clear()

    def _alive(self, key: bytes, at: float) -> StoredEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        alive = unexpired(entry, at)
        if alive is None:
            del self._entries[key]
        elif alive is not entry:
            self._entries[key] = alive
        return alive
