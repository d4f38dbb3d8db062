"""Nodes dropped from the routing table as unreachable are pinged again, and come back when they
answer: a node that was down for a while (or cut off by a partition) is not forgotten for good.

The swarm's nodes run in worker processes (`tests/dht_swarm.py`); the node that goes down and
comes back runs in the test process, so that it can return on the same port with the same
identity.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from dht_swarm import Swarm
from prometheus_client import CollectorRegistry

from apiary.dht import DHTNode
from apiary.dht.routing import Contact, Unreachable
from apiary.wire import ChannelPool, Endpoint, Identity, PeerAddress, WireSettings

REPING_PERIOD = 1.0


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool() as pool:
        yield pool


async def routing_sizes(swarm: Swarm, pool: ChannelPool) -> list[int]:
    return [(await swarm.client(node, pool).info()).routing_table_size for node in swarm.nodes]


async def test_a_node_that_was_down_is_pinged_again_and_rejoins_every_routing_table(pool: ChannelPool) -> None:
    with Swarm(workers=3, nodes_per_worker=1, settings={"reping_period": REPING_PERIOD}, seed=11) as swarm:
        identity = Identity.generate()
        returning = await DHTNode.launch([swarm.nodes[0].peer_address], identity=identity)
        port = returning.server.port
        assert await routing_sizes(swarm, pool) == [3, 3, 3]  # everyone learned the newcomer

        await returning.shutdown()
        # every node looks for a key nobody has, asking every node it knows: the one that is
        # down refuses the connection and is dropped
        for node in swarm.nodes:
            assert await swarm.client(node, pool).get(f"nothing-{node.index}") is None
        assert await routing_sizes(swarm, pool) == [2, 2, 2]

        # back on the same port, as the same peer, knowing nobody: it contacts no one itself
        returning = await DHTNode.launch(
            [], identity=identity, wire=WireSettings(listen_host="127.0.0.1", port=port, bulk=False)
        )
        try:
            assert len(returning.routing) == 0
            assert await returning.store("kept while alone", "by the returning node", time.time() + 60)
            deadline = time.monotonic() + 10 * REPING_PERIOD
            while (sizes := await routing_sizes(swarm, pool)) != [3, 3, 3]:
                assert time.monotonic() < deadline, f"the returning node is not back in every table: {sizes}"
                await asyncio.sleep(0.2)
            assert len(returning.routing) == 3  # it learned the swarm from their pings
            for node in swarm.nodes:
                found = await swarm.client(node, pool).get("kept while alone")
                assert found is not None and found.value == "by the returning node", node.index
        finally:
            await returning.shutdown()


async def test_reping_counts_the_nodes_that_answered_and_the_gauge_follows() -> None:
    registry = CollectorRegistry()
    node = await DHTNode.launch(registry=registry)
    identity = Identity.generate()
    other = await DHTNode.launch([PeerAddress.parse(node.address)], identity=identity)
    port = other.server.port
    try:
        assert len(node.routing) == 1
        await other.shutdown()
        assert await node.get("anything") is None  # asks the other node, which is gone
        assert len(node.routing) == 0
        assert registry.get_sample_value("apiary_dht_unreachable_nodes") == 1
        assert await node.reping() == 0  # still gone: still remembered
        assert registry.get_sample_value("apiary_dht_unreachable_nodes") == 1

        other = await DHTNode.launch([], identity=identity,
                                     wire=WireSettings(listen_host="127.0.0.1", port=port, bulk=False))
        assert await node.reping() == 1
        assert [c.peer_id for c in node.routing.contacts()] == [identity.peer_id]
        assert registry.get_sample_value("apiary_dht_unreachable_nodes") == 0
    finally:
        await other.shutdown()
        await node.shutdown()


def contact(number: int) -> Contact:
    return Contact(f"peer-{number}", Endpoint("127.0.0.1", 1000 + number))


def test_unreachable_contacts_are_bounded_and_forgotten_after_keep_for(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    remembered = Unreachable(keep_for=60, limit=3)
    for number in range(5):
        remembered.add(contact(number))
        now[0] += 10
    assert remembered.contacts() == [contact(2), contact(3), contact(4)]  # the newest 3

    remembered.add(contact(2))  # failed again: keeps its first removal time (t=120)
    remembered.discard("peer-3")  # answered
    now[0] = 120 + 60 + 1
    assert remembered.contacts() == [contact(4)]
    now[0] = 140 + 60 + 1
    assert remembered.contacts() == [] and len(remembered) == 0
