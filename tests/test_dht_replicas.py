"""A writer that stores a key again goes straight to the nodes its last lookup found
(dht/replicas.py), on real nodes over gRPC: no Find for a repeated store, the newest value on
every replica; a replica that dies or a newcomer nearer the key sends the next store through a
lookup again, so writes follow the key's nearest nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.ids import distance, id_of, id_to_bytes, node_id
from apiary.dht.node import pack
from apiary.wire import Identity, PeerAddress

NODES = 12
KEY = "replicas-key"
SETTINGS = DHTSettings(bucket_size=4, num_replicas=3, cache_on_lookup=False)


@pytest.fixture
async def swarm() -> AsyncIterator[list[DHTNode]]:
    first = await DHTNode.launch(settings=SETTINGS)
    nodes = [first] + [await DHTNode.launch([PeerAddress.parse(first.address)], settings=SETTINGS)
                       for _ in range(NODES - 1)]
    yield nodes
    await asyncio.gather(*(node.shutdown() for node in nodes))


def nearest(nodes: list[DHTNode], count: int = SETTINGS.num_replicas) -> list[DHTNode]:
    key_id = id_of(pack(KEY))
    return sorted(nodes, key=lambda node: distance(node.id, key_id))[:count]


def kept_ids(writer: DHTNode) -> set[str]:
    """The peer ids of the nodes `writer` stores KEY on without a lookup."""
    return {contact.peer_id for contact in writer.replicas.get(id_of(pack(KEY))) or []}


async def holds(node: DHTNode, value: int) -> bool:
    entry = await node.storage.get(id_to_bytes(id_of(pack(KEY))))
    return entry is not None and entry.value is not None and entry.value.value == pack(value)


async def test_a_repeated_store_sends_no_lookup_and_reaches_every_replica(swarm: list[DHTNode]) -> None:
    registry = CollectorRegistry()
    far = distance(nearest(swarm, SETTINGS.num_replicas + 1)[-1].id, id_of(pack(KEY)))
    identity = next(i for i in iter(Identity.generate, None) if distance(node_id(i.peer_id), id_of(pack(KEY))) > far)
    writer = await DHTNode.launch([PeerAddress.parse(swarm[-1].address)], identity=identity, settings=SETTINGS,
                                  registry=registry)  # not among the key's nearest, even once one of them is gone
    finds = lambda: registry.get_sample_value("apiary_dht_outgoing_rpcs_total", {"method": "Find", "outcome": "ok"}) or 0.0  # noqa: E731
    try:
        assert await writer.store(KEY, 1, time.time() + 60)
        looked_up = finds()
        assert looked_up > 0
        for value in (2, 3, 4):
            assert await writer.store(KEY, value, time.time() + 60)
        assert finds() == looked_up, "a store within replica_cache_ttl looked the key up again"
        kept = [node for node in swarm if node.identity.peer_id in kept_ids(writer)]
        assert len(kept) == SETTINGS.num_replicas
        assert [await holds(node, 4) for node in kept] == [True] * len(kept)
        assert not any([await holds(node, 4) for node in swarm if node not in kept])  # (no cached copies: off)

        # a kept node dies: the store after it still lands on the others, the next one looks up
        # again and keeps live nodes only
        dead = kept[0]
        await dead.shutdown()
        swarm.remove(dead)
        assert await writer.store(KEY, 5, time.time() + 60)
        assert await writer.store(KEY, 6, time.time() + 60)
        assert finds() > looked_up
        assert dead.identity.peer_id not in kept_ids(writer)
        assert all([await holds(node, 6) for node in swarm if node.identity.peer_id in kept_ids(writer)])
        found = await swarm[0].get(KEY, latest=True)
        assert found is not None and found.value == 6
    finally:
        await writer.shutdown()


async def test_a_newcomer_nearer_the_key_gets_the_next_store(swarm: list[DHTNode]) -> None:
    writer = swarm[-1]
    assert await writer.store(KEY, 1, time.time() + 60)
    farthest = max(distance(node.id, id_of(pack(KEY))) for node in nearest(swarm))
    identity = next(identity for identity in iter(Identity.generate, None)
                    if distance(node_id(identity.peer_id), id_of(pack(KEY))) < farthest)
    newcomer = await DHTNode.launch([PeerAddress.parse(writer.address)], identity=identity, settings=SETTINGS)
    try:  # the newcomer joined through the writer, which so learned of it
        assert await writer.store(KEY, 2, time.time() + 60)
        assert await holds(newcomer, 2), "the store after a nearer newcomer joined went to the old replicas"
    finally:
        await newcomer.shutdown()


async def test_without_replica_caching_every_store_looks_up() -> None:
    settings = SETTINGS.model_copy(update={"replica_cache_ttl": 0.0})
    registry = CollectorRegistry()
    first = await DHTNode.launch(settings=settings)
    others = [await DHTNode.launch([PeerAddress.parse(first.address)], settings=settings) for _ in range(4)]
    writer = await DHTNode.launch([PeerAddress.parse(first.address)], settings=settings, registry=registry)
    finds = lambda: registry.get_sample_value("apiary_dht_outgoing_rpcs_total", {"method": "Find", "outcome": "ok"}) or 0.0  # noqa: E731
    try:
        assert await writer.store(KEY, 1, time.time() + 60)
        looked_up = finds()
        assert await writer.store(KEY, 2, time.time() + 60)
        assert finds() > looked_up
    finally:
        await asyncio.gather(*(node.shutdown() for node in [writer, *others, first]))


async def test_a_store_whose_kept_nodes_are_all_gone_lands_on_the_nodes_a_new_lookup_finds(swarm: list[DHTNode]) -> None:
    writer = next(node for node in reversed(swarm) if node not in nearest(swarm, 2 * SETTINGS.num_replicas))
    assert await writer.store(KEY, 1, time.time() + 60)
    kept = kept_ids(writer)
    assert len(kept) == SETTINGS.num_replicas
    for node in [node for node in swarm if node.identity.peer_id in kept]:
        await node.shutdown()
        swarm.remove(node)
    assert await writer.store(KEY, 2, time.time() + 60), "the store failed with its kept nodes gone"
    reader = next(node for node in swarm if node is not writer)
    found = await reader.get(KEY, latest=True)
    assert found is not None and found.value == 2
