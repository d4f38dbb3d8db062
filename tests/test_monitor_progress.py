"""The monitor reads a run's progress whole (`apiary.formats.progress.read_whole`), in the format
the optimizer writes, from one key in a small swarm and from every shard of a large one."""

from __future__ import annotations

import random
import time

import pytest

from apiary.dht import DHTNode, DHTSettings
from apiary.formats.progress import progress_key, read_whole, swarm_epoch
from apiary.monitor.view import read_swarm, runs_json
from apiary.optim.progress import PROBE_EVERY, ProgressTracker
from apiary.services.records import PEERS_KEY, build_record, record_subkey
from test_optim_progress import nodes  # noqa: F401 - the fixture: four real DHT nodes
from test_optim_progress_shards import Ticks, Unsigned, peer_ids


@pytest.mark.parametrize("epochs", [[3], [3, 5], [2, 5, 5], [1, 4, 7], [0, 0, 9]])
async def test_signed_progress_records_read_whole_as_the_optimizer_reads_them(nodes, epochs):
    writers = [ProgressTracker(node, "run", node.identity.peer_id) for node in nodes[1:1 + len(epochs)]]
    for index, (tracker, epoch) in enumerate(zip(writers, epochs)):
        assert await tracker.publish(epoch, 10 * index, 2.5 * index)
    records = await read_whole(nodes[0], "run", timeout=5)
    assert [(r.peer_id, r.epoch, r.samples, r.samples_per_second) for r in records] == sorted(
        (t.peer_id, e, 10 * i, 2.5 * i) for i, (t, e) in enumerate(zip(writers, epochs)))
    assert swarm_epoch(records) == (await ProgressTracker(nodes[0], "run", "not-a-peer").fetch()).epoch


async def test_a_sharded_swarm_of_two_hundred_is_read_whole():
    """200 peers on keys of at most 64 records move up to sharded keys (as in
    tests/test_optim_progress_shards.py); the one key of level 0 keeps 64 stale records."""
    node = await DHTNode.launch(validator=Unsigned(), settings=DHTSettings(max_subkeys=64))
    try:
        ticks = Ticks()
        ids = peer_ids(random.Random(7), 200)
        trackers = [ProgressTracker(node, "big", peer, clock=ticks.clock) for peer in ids]
        for _ in range(PROBE_EVERY + 1):
            ticks.now += 1
            stored = [await tracker.publish(epoch=0, samples=1, samples_per_second=1.0) for tracker in trackers]
            if all(stored) and all(tracker._peers and tracker._peers > 64 for tracker in trackers):
                break
            for tracker in trackers:
                await tracker.fetch()
        assert all(stored)
        ticks.now += 1
        for i, tracker in enumerate(trackers):
            assert await tracker.publish(epoch=3, samples=i, samples_per_second=2.0)

        one_key = await node.get(progress_key("big"), latest=True)
        assert len(one_key.value) <= 64  # what a reader of the one key alone would show
        records = await read_whole(node, "big", timeout=5)
        assert [r.peer_id for r in records] == sorted(ids)
        assert {r.epoch for r in records} == {3} and sum(r.samples for r in records) == sum(range(200))

        trainer = build_record("trainer", ids[0], time.time(), {"run_id": "big"})
        assert await node.store(PEERS_KEY, trainer.as_value(), time.time() + 60,
                                subkey=record_subkey(node.identity.peer_id, ids[0]))
        run = runs_json(await read_swarm(node, timeout=5))["runs"][0]  # as the monitor's page shows it
        assert (run["run"], run["peers"], run["epoch"], run["samples"]) == ("big", 200, 3, sum(range(200)))
        assert len(run["leaderboard"]) == 200
    finally:
        await node.shutdown()
