"""The monitor's torch-free readers (`apiary.monitor.readers`) read what the optim and moe layers
write exactly as those layers read it back, on real DHT nodes."""

from __future__ import annotations

import pytest

from apiary.dht import DHTNode
from apiary.moe.declaration import declare_experts, find_experts, grid_coordinates
from apiary.monitor import readers
from apiary.optim.progress import ProgressTracker, progress_key
from apiary.wire import PeerAddress


@pytest.fixture
async def nodes():
    first = await DHTNode.launch()
    others = [await DHTNode.launch([PeerAddress.parse(first.address)]) for _ in range(3)]
    yield [first, *others]
    for node in [first, *others]:
        await node.shutdown()


@pytest.mark.parametrize("epochs", [[3], [3, 5], [2, 5, 5], [1, 4, 7], [0, 0, 9]])
async def test_progress_records_read_as_the_optimizer_reads_them(nodes, epochs):
    writers = [ProgressTracker(node, "run", node.identity.peer_id) for node in nodes[1:1 + len(epochs)]]
    for index, (tracker, epoch) in enumerate(zip(writers, epochs)):
        assert await tracker.publish(epoch, 10 * index, 2.5 * index)
    reader = nodes[0]
    records = readers.read_progress(await reader.get(readers.progress_key("run"), latest=True))
    assert readers.progress_key("run") == progress_key("run")
    assert [(r.peer_id, r.epoch, r.samples, r.samples_per_second) for r in records] == sorted(
        (t.peer_id, e, 10 * i, 2.5 * i) for i, (t, e) in enumerate(zip(writers, epochs)))
    assert readers.swarm_epoch(records) == (await ProgressTracker(reader, "run", "not-a-peer").fetch()).epoch


async def test_expert_declarations_read_as_the_mixture_reads_them(nodes):
    names = ["ffn.0.0", "ffn.0.1", "ffn.1.0"]
    address = f"{nodes[1].identity.peer_id}@127.0.0.1:1"
    assert all(await declare_experts(nodes[1], names, address, ttl=30))
    asked = [*names, "ffn.2.0"]
    assert await readers.find_experts(nodes[0], asked) == await find_experts(nodes[0], asked)
    for name in names:
        assert readers.grid_coordinates(name) == grid_coordinates(name)
    for name in ("ffn", "ffn.x", ".1"):
        with pytest.raises(ValueError):
            grid_coordinates(name)
        assert readers.grid_coordinates(name) is None
