"""Kademlia section 2.5 on real nodes: a node that joins and becomes one of a record's nearest
nodes is given the record by the nodes that held it, without anyone reading or writing it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.ids import distance, id_of, id_to_bytes, node_id
from apiary.dht.node import pack
from apiary.dht.validation import owner_marker
from apiary.wire import Identity, PeerAddress

SETTINGS = DHTSettings(num_replicas=2, cache_on_lookup=False)


@pytest.fixture
async def swarm() -> AsyncIterator[list[DHTNode]]:
    first = await DHTNode.launch(settings=SETTINGS)
    nodes = [first] + [await DHTNode.launch([PeerAddress.parse(first.address)], settings=SETTINGS) for _ in range(3)]
    yield nodes
    await asyncio.gather(*(node.shutdown() for node in nodes))


def key_nearest_to(newcomer: Identity, nodes: list[DHTNode], prefix: str) -> str:
    """A key whose id is nearer the newcomer's id than any node's of the swarm."""
    target = node_id(newcomer.peer_id)
    for n in itertools.count():
        key = f"{prefix}{n}"
        theirs = distance(id_of(pack(key)), target)
        if all(distance(id_of(pack(key)), node.id) > theirs for node in nodes):
            return key
    raise AssertionError("unreachable")


async def held_locally(node: DHTNode, key: str, within: float = 10.0) -> bool:
    """Whether `node` itself comes to hold `key` (its own storage, no lookup)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await node.storage.get(id_to_bytes(id_of(pack(key)))) is not None:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_newcomer_nearest_to_stored_records_is_given_them(swarm: list[DHTNode]) -> None:
    newcomer_identity = Identity.generate()
    owner = swarm[1].identity
    plain = key_nearest_to(newcomer_identity, swarm, "plain-")
    signed = key_nearest_to(newcomer_identity, swarm, f"signed{owner_marker(owner.peer_id)}-")
    expiration = time.time() + 600
    assert await swarm[1].store(plain, {"epoch": 7}, expiration)
    assert await swarm[1].store(signed, "a", expiration, subkey="first")
    assert await swarm[1].store(signed, "b", expiration + 1, subkey="second")

    newcomer = await DHTNode.launch([PeerAddress.parse(swarm[0].address)], identity=newcomer_identity,
                                    settings=SETTINGS)
    try:
        assert await held_locally(newcomer, plain) and await held_locally(newcomer, signed)
        # both records are now held locally, so these reads are answered without a lookup
        found = await newcomer.get(plain)
        assert found is not None and found.value == {"epoch": 7} and found.expiration == expiration
        found = await newcomer.get(signed)
        assert found is not None
        assert {subkey: (f.value, f.expiration) for subkey, f in found.value.items()} == {
            "first": ("a", expiration), "second": ("b", expiration + 1)
        }
    finally:
        await newcomer.shutdown()


async def test_a_newcomer_far_from_the_records_is_given_none(swarm: list[DHTNode]) -> None:
    key = "far"
    assert await swarm[2].store(key, 1, time.time() + 600)
    holders = sorted(swarm, key=lambda node: distance(node.id, id_of(pack(key))))[: SETTINGS.num_replicas]
    while True:  # a newcomer farther from the key than its replicas
        identity = Identity.generate()
        if distance(node_id(identity.peer_id), id_of(pack(key))) > distance(holders[-1].id, id_of(pack(key))):
            break
    newcomer = await DHTNode.launch([PeerAddress.parse(swarm[0].address)], identity=identity, settings=SETTINGS)
    try:
        assert not await held_locally(newcomer, key, within=2.0)
    finally:
        await newcomer.shutdown()
