"""Progress records through a real DHT: what a peer believes of the swarm, and of liars."""

from __future__ import annotations

import pytest

from apiary.dht import DHTNode
from apiary.optim.progress import ProgressTracker
from apiary.wire import PeerAddress


@pytest.fixture
async def nodes():
    first = await DHTNode.launch()
    others = [await DHTNode.launch([PeerAddress.parse(first.address)]) for _ in range(3)]
    yield [first, *others]
    for node in [first, *others]:
        await node.shutdown()


async def test_the_swarm_view_sums_the_others_at_the_epoch_and_ignores_a_lying_peer(nodes):
    honest = [ProgressTracker(node, "run", node.identity.peer_id) for node in nodes[:3]]
    liar = ProgressTracker(nodes[3], "run", nodes[3].identity.peer_id)
    for tracker, samples in zip(honest, (100, 200, 300)):
        assert await tracker.publish(epoch=4, samples=samples, samples_per_second=50.0)
    view = await honest[0].fetch()
    assert view.epoch == 4 and view.peers == 3 and view.reported == 500 and view.samples_per_second == 100

    # one peer claims a far epoch and a billion samples at a billion samples per second
    assert await liar.publish(epoch=10**6, samples=10**9, samples_per_second=1e9)
    view = await honest[0].fetch()
    assert view.epoch == 4, "one peer alone moved the swarm's epoch"
    assert await liar.publish(epoch=4, samples=10**9, samples_per_second=1e9)
    view = await honest[0].fetch()
    assert view.peers == 4
    # counted at most: 4 x the median throughput (50..1e9 -> 125) x (time seen + 5 s of grace)
    assert view.reported < 500 + 4 * 125 * 10, view


async def test_a_peer_ahead_of_the_swarm_counts_toward_its_own_epoch(nodes):
    trackers = [ProgressTracker(node, "ahead", node.identity.peer_id) for node in nodes[:3]]
    await trackers[1].publish(epoch=2, samples=40, samples_per_second=10.0)
    await trackers[2].publish(epoch=3, samples=8, samples_per_second=10.0)
    await trackers[0].publish(epoch=3, samples=16, samples_per_second=10.0)
    view = await trackers[0].fetch()
    assert view.epoch == 3 and view.reported == 8  # the one other peer at epoch 3, not epoch 2's 40
