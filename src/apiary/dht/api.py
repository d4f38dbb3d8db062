"""The local API: how a participant's other services use its DHT node over gRPC.

`LOCAL_SERVICE` is served next to the node on a local-only port; `DHTClient` calls it with the
same methods as `DHTNode` (`get`, `get_many`, `store`, `store_many`, plus `info`, and `contacts`:
a sample of the node's routing table, whom a service asks to check its reachability), so
services work the same against an embedded node or the participant's dht service.
"""

from __future__ import annotations

import random
from typing import Any

from apiary.dht.node import DHTNode, Found, pack, unpack
from apiary.dht.protos.dht_pb2 import (
    FoundValue,
    LocalContactsRequest,
    LocalContactsResponse,
    LocalGetRequest,
    LocalGetResponse,
    LocalInfoRequest,
    LocalInfoResponse,
    LocalStoreRequest,
    LocalStoreResponse,
    StoreItem,
    SubkeyValue,
)
from apiary.wire import CallContext, ChannelPool, Endpoint, InvalidRequest, Method, PeerAddress, RpcClient, ServiceSpec

LOCAL_SERVICE = ServiceSpec(
    "apiary.dht.Local",
    (
        Method("Get", LocalGetRequest, LocalGetResponse),
        Method("Store", LocalStoreRequest, LocalStoreResponse),
        Method("Info", LocalInfoRequest, LocalInfoResponse),
        Method("Contacts", LocalContactsRequest, LocalContactsResponse),
    ),
    local=True,
)


def _unpack_field(raw: bytes, what: str, index: int) -> Any:
    try:
        return unpack(raw)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidRequest(f"item {index}: {what} is not msgpack: {e}") from None


def _to_message(found: Found | None) -> FoundValue:
    if found is None:
        return FoundValue(found=False)
    if isinstance(found.value, dict) and all(isinstance(v, Found) for v in found.value.values()) and found.value:
        return FoundValue(
            found=True,
            expiration=found.expiration,
            subkeys=[SubkeyValue(subkey=pack(k), value=pack(v.value), expiration=v.expiration) for k, v in found.value.items()],
        )
    return FoundValue(found=True, value=pack(found.value), expiration=found.expiration)


def _from_message(message: FoundValue) -> Found | None:
    if not message.found:
        return None
    if message.subkeys:
        return Found({unpack(s.subkey): Found(unpack(s.value), s.expiration) for s in message.subkeys}, message.expiration)
    return Found(unpack(message.value), message.expiration)


class LocalServicer:
    """Serves `LOCAL_SERVICE` for a node."""

    def __init__(self, node: DHTNode):
        self.node = node

    async def get(self, request: LocalGetRequest, context: CallContext) -> LocalGetResponse:
        keys = [_unpack_field(raw, "key", i) for i, raw in enumerate(request.keys)]
        remaining = context.time_remaining()  # the lookup ends in time for the answer to reach the caller
        found = await self.node.get_many(keys, latest=request.latest,
                                         timeout=None if remaining is None else 0.9 * remaining)
        return LocalGetResponse(values=[_to_message(f) for f in found])

    async def store(self, request: LocalStoreRequest, context: CallContext) -> LocalStoreResponse:
        items = []
        for i, item in enumerate(request.items):
            subkey = _unpack_field(item.subkey, "subkey", i) if item.has_subkey else None
            items.append((_unpack_field(item.key, "key", i), subkey, _unpack_field(item.value, "value", i), item.expiration))
        remaining = context.time_remaining()  # the stores end in time for the answer to reach the caller
        try:
            stored = await self.node.store_many(items, timeout=None if remaining is None else 0.9 * remaining)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return LocalStoreResponse(stored=stored)

    async def info(self, request: LocalInfoRequest, context: CallContext) -> LocalInfoResponse:
        return LocalInfoResponse(
            peer_id=self.node.identity.peer_id,
            address=self.node.address,
            client_mode=self.node.settings.client_mode,
            routing_table_size=len(self.node.routing),
        )

    async def contacts(self, request: LocalContactsRequest, context: CallContext) -> LocalContactsResponse:
        if request.limit < 0:
            raise InvalidRequest(f"limit={request.limit} must be at least 0")
        contacts = self.node.routing.contacts()
        sample = random.sample(contacts, min(request.limit, len(contacts)))
        return LocalContactsResponse(addresses=[str(PeerAddress(c.endpoint, c.peer_id)) for c in sample])


class DHTClient:
    """The participant's DHT node, seen from another local service.

    The local API itself is plaintext; `pool` is what this process dials the swarm with (its
    wire settings and credentials), which layers built on this client (e.g. a mixture of
    experts) dial with too."""

    def __init__(self, endpoint: Endpoint, pool: ChannelPool | None = None, *, timeout: float = 30.0):
        self.pool = pool or ChannelPool()
        self._rpc = RpcClient(self.pool, LOCAL_SERVICE, endpoint, timeout=timeout)

    async def get(self, key: Any, latest: bool = False, *, timeout: float | None = None) -> Found | None:
        return (await self.get_many([key], latest=latest, timeout=timeout))[0]

    async def get_many(self, keys: list[Any], latest: bool = False, *, timeout: float | None = None
                       ) -> list[Found | None]:
        """With `timeout`, the node's search ends in time to answer within that many seconds."""
        response = await self._rpc.call("Get", LocalGetRequest(keys=[pack(k) for k in keys], latest=latest),
                                        timeout=timeout)
        return [_from_message(v) for v in response.values]

    async def store(self, key: Any, value: Any, expiration: float, subkey: Any = None) -> bool:
        return (await self.store_many([(key, subkey, value, expiration)]))[0]

    async def store_many(self, items: list[tuple[Any, Any, Any, float]]) -> list[bool]:
        request = LocalStoreRequest(
            items=[
                StoreItem(key=pack(key), has_subkey=subkey is not None, subkey=pack(subkey) if subkey is not None else b"",
                          value=pack(value), expiration=expiration)
                for key, subkey, value, expiration in items
            ]
        )
        return list((await self._rpc.call("Store", request)).stored)

    async def info(self) -> LocalInfoResponse:
        return await self._rpc.call("Info", LocalInfoRequest())

    async def contacts(self, limit: int) -> list[PeerAddress]:
        """At most `limit` of the node's contacts, a random sample of its routing table."""
        response = await self._rpc.call("Contacts", LocalContactsRequest(limit=limit))
        return [PeerAddress.parse(address) for address in response.addresses]
