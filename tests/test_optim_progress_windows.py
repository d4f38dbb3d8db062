"""Window sums (formats/aggregates.py): past 16 shards a shard's aggregators also publish the sums
of the 16 shards from theirs, and a reader reads the windows from its own shard on, a key every
16 shards: at 1,024 peers (32 shards) two keys cover the swarm and the count is exact. One lying
aggregator moves no reader; where windows are missing a reader reads its own window shard by
shard, as without windows.

Many `ProgressTracker`s share one real DHT node whose records are not signed (as in
test_optim_progress_shards.py), in virtual time.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from apiary.dht import DHTNode
from apiary.dht.validation import owner_marker
from apiary.formats.aggregates import MAX_AGE, WINDOW, EpochSum, ShardSum, aggregate_key, designated, window_starts
from apiary.formats.shards import shard_of
from apiary.optim.progress import CONFIDENCE, progress_key
from tests.test_optim_progress_shards import Unsigned
from tests.test_optim_progress_sums import Swarm, a_sum

PEERS = 1024  # 32 shards of ~32 records: two windows
SHARDS = 32


def test_a_window_reads_back_with_its_shard_and_a_malformed_one_is_dropped():
    window = ShardSum(100.0, 500, (1, 1), {1: EpochSum(500, 5000.0, 60000.0, 5100.0, 5000.0)}, WINDOW)
    summed = ShardSum(100.0, 32, (1, 1), {1: EpochSum(32, 320.0, 3500.0, 330.0, 320.0)}, 1, window)
    assert ShardSum.from_value(summed.as_value()) == summed
    good = summed.as_value()
    for bad in [{**good["window"], "shards": 2}, {**good["window"], "time": 99.0}, {**good["window"], "peers": 3},
                "garbage"]:
        assert ShardSum.from_value({**good, "window": bad}) == replace(summed, window=None), bad
    assert ShardSum.from_value({**good["window"]}) is None  # a window is no shard's own sum
    for shards in (32, 256, 4096):
        starts = window_starts(5, shards)
        covered = [(start + i) % shards for start in starts for i in range(WINDOW)]
        assert starts[0] == 5 and len(covered) == len(set(covered)) == min(shards, 256)


@pytest.fixture
async def swarm():
    node = await DHTNode.launch(validator=Unsigned())
    swarm = Swarm(node, PEERS, "windows", seed=11)
    for _ in range(3):  # no sums yet; the shards' sums; their windows
        await swarm.refresh()
    yield swarm
    await node.shutdown()


async def test_two_window_keys_give_a_reader_of_32_shards_the_exact_count(swarm):
    i, reader = swarm.reader()
    view = await reader.fetch()
    own = shard_of(reader.peer_id, SHARDS)
    assert reader.dht.asked == [aggregate_key(progress_key("windows", SHARDS, s)) for s in sorted(window_starts(own, SHARDS))]
    assert (view.shards, view.peers, view.reported, view.error) == (SHARDS, PEERS, swarm.exact(i), 0.0)


async def test_one_lying_aggregator_moves_no_window_and_missing_windows_are_read_around(swarm):
    i, reader = swarm.reader()
    start = window_starts(shard_of(reader.peer_id, SHARDS), SHARDS)[1]
    key = progress_key("windows", SHARDS, start)
    liar = designated([peer for peer in swarm.ids if shard_of(peer, SHARDS) == start], key)[0]
    now = swarm.ticks.clock.time()
    window = ShardSum(now, 10**6, (7, 7), {7: EpochSum(10**6, 1e12, 1e18, 1e12, 1e9)}, WINDOW)  # a million peers, far ahead
    lie = ShardSum(now, 32, (1, 1), {1: EpochSum(32, 320.0, 3200.0, 320.0, 320.0)}, 1, window)
    assert await swarm.node.store(aggregate_key(key), lie.as_value(), now + MAX_AGE + 1, subkey=owner_marker(liar))
    view = await reader.fetch()
    assert (view.epoch, view.peers, view.reported, view.error) == (1, PEERS, swarm.exact(i), 0.0)

    swarm.ticks.now += MAX_AGE + 1  # the aggregators stopped refreshing: sums and windows are stale
    reader.dht.asked.clear()
    view = await reader.fetch()
    consecutive = [(shard_of(reader.peer_id, SHARDS) + k) % SHARDS for k in range(WINDOW)]
    assert sorted(key for key in reader.dht.asked if not key.endswith(".sum")) == sorted(
        progress_key("windows", SHARDS, s) for s in consecutive)  # its own window, shard by shard
    assert view.epoch == 1 and 0 < view.error and view.reported <= swarm.exact(i)
    assert abs((view.reported + CONFIDENCE * view.error) / swarm.exact(i) - 1) < 0.15  # half the swarm read
