"""Copies of other nodes' records, kept for a while: the caching of section 2.3 of the Kademlia
paper. A node that found a value stores it on the nearest node of its lookup that lacked it, so
that later lookups of a popular key end there instead of at the key's nearest nodes.

A cached copy keeps its record as written (signature and expiration included, so a reader
validates it as an original) and is dropped at the earlier of the record's expiration and the
time the cacher asked for (`keep_for`, which shrinks with the copy's distance from the key's
nearest nodes). Copies merge by the storage rules (`base`): a newer record replaces an older
one, a dictionary's subkeys merge. Cached copies are never republished: they are not the node's
own records.
"""

from __future__ import annotations

from apiary.clock import REAL, Clock
from apiary.dht.storage.base import StoredEntry, ValueWithExpiration, accepts, merged, unexpired


class LookupCache:
    """At most `max_keys` keys of cached copies; when full, the key dropped soonest goes first."""

    def __init__(self, max_keys: int, clock: Clock = REAL) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._entries: dict[bytes, tuple[StoredEntry, float]] = {}  # key: (copy, dropped at)

    def store(self, key: bytes, subkey: bytes | None, value: bytes, expiration: float, keep_for: float) -> bool:
        """Caches one record for at most `keep_for` seconds; False if it is not newer than the copy held."""
        at = self.clock.time()
        current = self.get(key)
        if keep_for <= 0 or not accepts(current, subkey, expiration, at):
            return False
        until = at + keep_for
        if current is not None:
            until = max(until, self._entries[key][1])
        elif len(self._entries) >= self.max_keys:
            self._evict(at)
        self._entries[key] = (merged(current, subkey, ValueWithExpiration(value, expiration)), until)
        return True

    def get(self, key: bytes) -> StoredEntry | None:
        """The copy of `key` held now (expired parts left out), or None."""
        held = self._entries.get(key)
        if held is None:
            return None
        at = self.clock.time()
        entry = unexpired(held[0], at) if held[1] > at else None
        if entry is None:
            del self._entries[key]
        elif entry is not held[0]:
            self._entries[key] = (entry, held[1])
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, at: float) -> None:
        for key in [key for key, (_, until) in self._entries.items() if until <= at]:
            del self._entries[key]
        if len(self._entries) >= self.max_keys:
            del self._entries[min(self._entries, key=lambda key: self._entries[key][1])]
