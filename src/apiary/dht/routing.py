"""The Kademlia routing table: k-buckets over id ranges that split as the paper prescribes.

A bucket covers a range of ids and holds up to `bucket_size` nodes, least recently seen
first (section 2.2 of the paper), plus a replacement cache (section 4.1). A full bucket splits
if its range contains our own id (section 2.4), or if its depth is not a multiple of
`depth_modulo` (the relaxed rule of section 4.2); otherwise newcomers wait in the replacement
cache until a node of the bucket fails.

Nodes removed because they stopped answering are remembered for a while (`Unreachable`), so
that the node can ask them again: after a network partition heals, nobody on either side
would otherwise remember anyone on the other.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

from apiary.clock import REAL, Clock
from apiary.dht.ids import MAX_ID, distance, node_id
from apiary.wire import Endpoint


@dataclass(frozen=True)
class Contact:
    """A reachable DHT node."""

    peer_id: str
    endpoint: Endpoint

    @cached_property
    def id(self) -> int:
        return node_id(self.peer_id)


class KBucket:
    def __init__(self, low: int, high: int, size: int, depth: int = 0, clock: Clock = REAL):
        self.clock = clock
        self.low, self.high, self.size, self.depth = low, high, size, depth
        self.nodes: OrderedDict[str, Contact] = OrderedDict()  # least recently seen first
        self.replacements: OrderedDict[str, Contact] = OrderedDict()
        self.last_updated = clock.monotonic()

    def covers(self, id_: int) -> bool:
        return self.low <= id_ < self.high

    def add_or_update(self, contact: Contact) -> bool:
        """Adds or refreshes a node; returns False if the bucket is full (it goes to replacements)."""
        self.last_updated = self.clock.monotonic()
        if contact.peer_id in self.nodes:
            self.nodes.move_to_end(contact.peer_id)
            self.nodes[contact.peer_id] = contact
            return True
        if len(self.nodes) < self.size:
            self.nodes[contact.peer_id] = contact
            return True
        self.replacements[contact.peer_id] = contact
        self.replacements.move_to_end(contact.peer_id)
        while len(self.replacements) > self.size:
            self.replacements.popitem(last=False)
        return False

    def remove(self, peer_id: str) -> bool:
        """Drops a failed node, promoting the freshest replacement in its place; returns whether
        the node was in the bucket (not just a replacement)."""
        self.replacements.pop(peer_id, None)
        if self.nodes.pop(peer_id, None) is None:
            return False
        if self.replacements:
            _, replacement = self.replacements.popitem()
            self.nodes[replacement.peer_id] = replacement
        return True

    def split(self) -> tuple[KBucket, KBucket]:
        middle = (self.low + self.high) // 2
        left = KBucket(self.low, middle, self.size, self.depth + 1, self.clock)
        right = KBucket(middle, self.high, self.size, self.depth + 1, self.clock)
        for contact in [*self.nodes.values(), *self.replacements.values()]:
            (left if left.covers(contact.id) else right).add_or_update(contact)
        return left, right


class RoutingTable:
    """Our view of the swarm, organised for finding the nodes nearest to any id."""

    def __init__(self, own_id: int, bucket_size: int = 20, depth_modulo: int = 5, clock: Clock = REAL):
        self.clock = clock
        self.own_id = own_id
        self.bucket_size = bucket_size
        self.depth_modulo = depth_modulo
        self.buckets = [KBucket(0, MAX_ID, bucket_size, clock=clock)]

    def bucket_index(self, id_: int) -> int:
        for index, bucket in enumerate(self.buckets):
            if bucket.covers(id_):
                return index
        raise AssertionError("buckets cover the whole id space")

    def add(self, contact: Contact) -> bool:
        """Adds a node we heard from; returns whether it is now in a bucket (not just cached)."""
        if contact.id == self.own_id:
            return False
        while True:
            index = self.bucket_index(contact.id)
            bucket = self.buckets[index]
            if bucket.add_or_update(contact):
                return True
            if bucket.covers(self.own_id) or bucket.depth % self.depth_modulo != 0:  # sections 2.4, 4.2
                self.buckets[index : index + 1] = bucket.split()
                continue
            return False

    def remove(self, peer_id: str, id_: int) -> bool:
        """Drops a node; returns whether it was in a bucket."""
        return self.buckets[self.bucket_index(id_)].remove(peer_id)

    def get(self, peer_id: str) -> Contact | None:
        return self.buckets[self.bucket_index(node_id(peer_id))].nodes.get(peer_id)

    def nearest(self, id_: int, count: int, exclude: str | None = None) -> list[Contact]:
        """The `count` known nodes nearest to `id_` by XOR distance. A bucket's range is an aligned
        power-of-two block of ids, so its distances to `id_` form one interval, apart from every
        other bucket's: buckets are visited nearest interval first and only those needed sorted."""
        found: list[Contact] = []
        for bucket in sorted(self.buckets, key=lambda b: distance(b.low, id_) & -(b.high - b.low)):
            if len(found) >= count:
                break
            found += sorted((c for c in bucket.nodes.values() if c.peer_id != exclude),
                            key=lambda c: distance(c.id, id_))
        return found[:count]

    def __len__(self) -> int:
        return sum(len(bucket.nodes) for bucket in self.buckets)

    def contacts(self) -> list[Contact]:
        return [c for bucket in self.buckets for c in bucket.nodes.values()]

    def stale_buckets(self, older_than: float) -> list[KBucket]:
        cutoff = self.clock.monotonic() - older_than
        return [bucket for bucket in self.buckets if bucket.last_updated < cutoff]


class Unreachable:
    """Contacts removed from the routing table as unreachable, with the time of their removal:
    the newest `limit` of them, each for `keep_for` seconds after its removal."""

    def __init__(self, keep_for: float, limit: int = 256, clock: Clock = REAL):
        self.clock = clock
        self.keep_for = keep_for
        self.limit = limit
        self._removed: OrderedDict[str, tuple[Contact, float]] = OrderedDict()  # oldest removal first

    def add(self, contact: Contact) -> None:
        """Remembers a contact just removed (one remembered already keeps its first removal time)."""
        if contact.peer_id in self._removed:
            self._removed[contact.peer_id] = (contact, self._removed[contact.peer_id][1])
            return
        self._removed[contact.peer_id] = (contact, self.clock.monotonic())
        while len(self._removed) > self.limit:
            self._removed.popitem(last=False)

    def discard(self, peer_id: str) -> None:
        """Forgets a contact (it answered, or is not the node it was)."""
        self._removed.pop(peer_id, None)

    def contacts(self) -> list[Contact]:
        """The contacts to ask again, after forgetting those removed more than `keep_for` ago."""
        cutoff = self.clock.monotonic() - self.keep_for
        while self._removed and next(iter(self._removed.values()))[1] < cutoff:
            self._removed.popitem(last=False)
        return [contact for contact, _ in self._removed.values()]

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._removed

    def __len__(self) -> int:
        return len(self._removed)
