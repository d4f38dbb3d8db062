"""The nodes a writer last found nearest a key, reused for its next stores there.

A peer that writes the same keys again and again (its progress record every refresh, its
experts' declarations, its averaging announcements) would otherwise run the node lookup of
section 2.3 before every store: about k Find calls answered with k contacts each, most of them
by the key's nearest nodes, which every writer of the key asks. A store instead goes straight to
the `num_replicas` nodes its last lookup found, for `replica_cache_ttl` seconds. An entry is
dropped when one of its nodes fails a store (the next store looks up again) and when the node
learns of a newcomer nearer the key than one of them, so that writes follow the records that
section 2.5's hand-over gives the newcomer.
"""

from __future__ import annotations

from collections import OrderedDict

from apiary.clock import REAL, Clock
from apiary.dht.ids import distance
from apiary.dht.routing import Contact


class ReplicaCache:
    """Per key id: the `replicas` nodes a lookup found nearest it, until `ttl` seconds have
    passed (at most `max_keys` keys, the least recently used dropped first)."""

    def __init__(self, ttl: float, replicas: int, max_keys: int = 1024, clock: Clock = REAL):
        self.ttl = ttl
        self.replicas = replicas
        self.max_keys = max_keys
        self.clock = clock
        self._entries: OrderedDict[int, tuple[float, list[Contact]]] = OrderedDict()

    def get(self, key_id: int) -> list[Contact] | None:
        """The key's nodes if a lookup found them less than `ttl` seconds ago."""
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        found_at, contacts = entry
        if self.clock.monotonic() - found_at >= self.ttl:
            del self._entries[key_id]
            return None
        self._entries.move_to_end(key_id)
        return contacts

    def put(self, key_id: int, contacts: list[Contact]) -> None:
        """Keeps what a complete lookup found (nothing when `ttl` is 0 or it found fewer than
        `replicas` nodes: a small swarm, whose newcomers all become replicas)."""
        if self.ttl <= 0 or len(contacts) < self.replicas:
            return
        self._entries[key_id] = (self.clock.monotonic(), contacts)
        self._entries.move_to_end(key_id)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    def failed(self, peer_id: str) -> None:
        """Drops every key a node that failed a store was kept for."""
        for key_id in [key_id for key_id, (_, contacts) in self._entries.items()
                       if any(c.peer_id == peer_id for c in contacts)]:
            del self._entries[key_id]

    def notice(self, newcomer: Contact) -> None:
        """Drops every key the newcomer is nearer to than one of the nodes kept for it."""
        for key_id in [key_id for key_id, (_, contacts) in self._entries.items()
                       if distance(newcomer.id, key_id) < max(distance(c.id, key_id) for c in contacts)]:
            del self._entries[key_id]
