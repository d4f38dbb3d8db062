"""Handing stored records to a newcomer that becomes one of their nearest nodes.

Kademlia, section 2.5: when a node learns of a node it did not know, it stores on the newcomer
the records for which the newcomer is now among the `num_replicas` nodes nearest the key. To
spare the newcomer redundant copies, only the holder nearest the key among the nodes it knows
(the newcomer left aside) hands a record over, as the paper suggests.

The work is bounded: newcomers wait in a queue of at most `QUEUE_LIMIT` (the oldest dropped),
are served one at a time, and get their records in Store requests of at most
`max_items_per_request` items sent one after the other; a failed request ends the hand-over.
Records keep their expirations, subkeys and signatures; the newcomer validates them as any
Store. A store keyed by DHT id alone does not know a record's key, so the node remembers the
key of each record it stored since it started (records read back from Redis after a restart are
handed over once written again).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from apiary.dht.ids import distance, id_from_bytes
from apiary.dht.messages import records_of
from apiary.dht.protos.dht_pb2 import StoreRequest
from apiary.dht.routing import Contact
from apiary.dht.validation import DHTRecord

if TYPE_CHECKING:
    from apiary.dht.node import DHTNode

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 256


class Republisher:
    """A node's hand-over of records to newcomers (run `run()` as a background task)."""

    def __init__(self, node: DHTNode):
        self.node = node
        self._keys: dict[bytes, bytes] = {}  # stored key id -> the key itself
        self._pending: OrderedDict[str, Contact] = OrderedDict()
        self._wake = asyncio.Event()

    def remember(self, key_id: bytes, key: bytes) -> None:
        """Notes the key of a record this node stored."""
        self._keys[key_id] = key

    def notice(self, newcomer: Contact) -> None:
        """Queues a node just added to the routing table for a hand-over."""
        if self.node.contact is None:  # a client-mode node holds no replicas
            return
        self._pending[newcomer.peer_id] = newcomer
        while len(self._pending) > QUEUE_LIMIT:
            self._pending.popitem(last=False)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                _, newcomer = self._pending.popitem(last=False)
                await self.hand_over(newcomer)

    async def hand_over(self, newcomer: Contact) -> int:
        """Stores on `newcomer` the records it should now hold; returns how many it accepted."""
        alive = set(await self.node.storage.keys())
        for key_id in [key_id for key_id in self._keys if key_id not in alive]:
            del self._keys[key_id]
        records: list[DHTRecord] = []
        for key_id, key in list(self._keys.items()):
            if self._hands_over(id_from_bytes(key_id), newcomer):
                entry = await self.node.storage.get(key_id)
                if entry is not None:
                    records += records_of(key, entry)
        accepted = 0
        for batch in self.node._batches(records):
            response = await self.node._call(newcomer, "Store", StoreRequest(sender=self.node._me(), items=batch))
            if response is None:
                break
            accepted += sum(response.stored)
        if records:
            logger.debug("handed %d of %d records to %s", accepted, len(records), newcomer.peer_id[:8])
        return accepted

    def _hands_over(self, key_id: int, newcomer: Contact) -> bool:
        """Whether the newcomer is among the key's replicas and this node the nearest other one."""
        replicas = self.node.settings.num_replicas
        others = [c for c in self.node.routing.nearest(key_id, replicas + 1) if c.peer_id != newcomer.peer_id]
        own = distance(self.node.id, key_id)
        if any(distance(c.id, key_id) < own for c in others):
            return False
        theirs = distance(newcomer.id, key_id)
        return sum(distance(c.id, key_id) < theirs for c in others) + (own < theirs) < replicas
