"""The DHT protocol, served: what a node answers to other nodes.

`NODE_SERVICE` is Kademlia's RPC set (section 2.3 of the paper) over gRPC: `Ping`, `Store` and
`Find` (FIND_NODE and FIND_VALUE in one: the value if held, else and also the nearest known
nodes), each carrying many keys or items. `NodeServicer` answers them for a `DHTNode`; every
request also tells the node of its sender (section 2.2: a node updates its k-buckets on every
message it receives), which may make the sender a newcomer that gets records (section 2.5).
Every reply tells the caller the address its call came from (`apiary.wire.observed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apiary.dht.ids import id_from_bytes, id_to_bytes
from apiary.dht.messages import check_items, contact_of, digest_value, found_value, node_info
from apiary.dht.protos.dht_pb2 import (
    FindRequest,
    FindResponse,
    FindResult,
    NodeInfo,
    PingRequest,
    PingResponse,
    StoreRequest,
    StoreResponse,
)
from apiary.wire import CallContext, InvalidRequest, Method, ServiceSpec
from apiary.wire.observed import observed_address

if TYPE_CHECKING:
    from apiary.dht.node import DHTNode

NODE_SERVICE = ServiceSpec(
    "apiary.dht.Node",
    (
        Method("Ping", PingRequest, PingResponse),
        Method("Store", StoreRequest, StoreResponse),
        Method("Find", FindRequest, FindResponse),
    ),
)


class NodeServicer:
    """Serves `NODE_SERVICE` for a node."""

    def __init__(self, node: DHTNode):
        self.node = node

    async def ping(self, request: PingRequest, context: CallContext) -> PingResponse:
        self._heard_from(request.sender)
        return PingResponse(node=self.node._me(), dht_time=self.node.clock.time(), observed_address=observed_address(context.peer))

    async def store(self, request: StoreRequest, context: CallContext) -> StoreResponse:
        settings = self.node.settings
        check_items(list(request.items), settings.max_items_per_request)
        self._heard_from(request.sender)
        if request.cache_for > 0:  # copies to cache (section 2.3), not records for this node to keep
            keep_for = min(request.cache_for, settings.cache_ttl)
            outcomes = [(await self.node._cache_local(item, keep_for), "") for item in request.items]
        else:
            outcomes = [await self.node._store_local(item) for item in request.items]
        stored, refused = [ok for ok, _ in outcomes], [why for _, why in outcomes]
        return StoreResponse(node=self.node._me(), stored=stored, refused=refused, observed_address=observed_address(context.peer))

    async def find(self, request: FindRequest, context: CallContext) -> FindResponse:
        node = self.node
        if len(request.key_ids) > node.settings.max_items_per_request:
            raise InvalidRequest(
                f"{len(request.key_ids)} keys in one request exceed max_items_per_request="
                f"{node.settings.max_items_per_request}"
            )
        try:
            ids = [id_from_bytes(raw) for raw in request.key_ids]
        except ValueError as e:
            raise InvalidRequest(f"key_ids: {e}") from None
        if len(request.after) > len(ids):
            raise InvalidRequest(f"{len(request.after)} cursors (after) for {len(ids)} key ids")
        self._heard_from(request.sender)
        results = []
        for index, key_id in enumerate(ids):
            entry, stored = await node._answer(id_to_bytes(key_id))
            if request.digests:  # a quorum read: it fetches the agreed content once, from one node
                value = digest_value(entry, stored)
            else:
                after = request.after[index] if index < len(request.after) else b""
                value = found_value(entry, after=after, page_bytes=node.settings.page_bytes)
                value.stored = value.found and stored
                if value.found:
                    node.metrics.served_copies.inc()
            results.append(FindResult(value=value, nearest=self._nearest(key_id, request, value.found)))
        return FindResponse(node=node._me(), results=results, observed_address=observed_address(context.peer))

    def _nearest(self, key_id: int, request: FindRequest, found: bool) -> list[NodeInfo]:
        """The nodes a Find answer names: k (section 2.3), none with a fetched value, and `parallelism`
        with a digest (the reader is among the key's holders: it needs a few more, not k)."""
        settings = self.node.settings
        count = 0 if request.value_only else settings.parallelism if request.digests and found else settings.bucket_size
        return [node_info(c) for c in self.node.routing.nearest(key_id, count, exclude=request.sender.peer_id)] if count else []

    def _heard_from(self, sender: NodeInfo) -> None:
        """Learns a sender into the routing table (client-mode senders have no address: never)."""
        node = self.node
        contact = contact_of(sender)
        if contact is not None and contact.peer_id != node.identity.peer_id:
            node._add(contact)
            if contact.peer_id in node.unreachable:  # back: our channel to it failed, so start a new one
                node.unreachable.discard(contact.peer_id)
                node._spawn(node.pool.discard(contact.endpoint))
