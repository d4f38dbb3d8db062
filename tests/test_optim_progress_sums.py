"""Shard sums (formats/aggregates.py): readers of a sharded swarm read each shard's sums, as the
three members ranked lowest publish them, instead of its records; one lying aggregator moves no
reader, and a shard whose sums are stale or missing is read whole.

Many `ProgressTracker`s share one real DHT node whose records are not signed (as in
test_optim_progress_shards.py), in virtual time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from apiary.dht import DHTNode
from apiary.dht.validation import owner_marker
from apiary.formats.aggregates import (AGGREGATORS, MAX_AGE, RETIRED, EpochSum, ShardSum, aggregate_key, designated,
                                       median_sum, rank, shard_sums)
from apiary.formats.shards import shard_of
from apiary.optim.progress import ProgressTracker, progress_key
from tests.test_optim_progress_shards import Ticks, Unsigned, peer_ids

PEERS = 512  # at 16 shards: every reader reads every shard, so its count is exact
SHARDS = 16


def a_sum(time: float, samples: float, *, epoch: int = 1, peers: int = 32) -> ShardSum:
    return ShardSum(time, peers, (epoch, epoch), {epoch: EpochSum(peers, samples, samples * samples / peers,
                                                                  samples, 10.0 * peers)})


def test_a_sum_reads_back_as_written_and_a_malformed_one_is_refused():
    summed = a_sum(100.0, 640.0)
    assert ShardSum.from_value(summed.as_value()) == summed
    good = summed.as_value()
    for bad in [None, [], {**good, "time": float("nan")}, {**good, "peers": 3},  # more at the epoch than records
                {**good, "newest": [3, 2, 1]}, {**good, "newest": []}, {**good, "epochs": [[1, 1, -5.0, 0, 0, 0]]},
                {**good, "epochs": [[1, 1, float("inf"), 0, 0, 0]]}, {**good, "epochs": [[1, 1, 2.0]]},
                {**good, "epochs": [[e, 1, 0, 0, 0, 0] for e in range(3)]}, {k: v for k, v in good.items() if k != "peers"}]:
        assert ShardSum.from_value(bad) is None, bad


def test_the_median_of_three_sums_is_an_honest_one_whatever_one_liar_claims():
    honest = [a_sum(0.0, 640.0), a_sum(0.0, 650.0)]
    for liar in [a_sum(0.0, 1e12), a_sum(0.0, 0.0), a_sum(0.0, 1e12, epoch=9), a_sum(0.0, 0.0, epoch=0)]:
        assert median_sum([liar, *honest]) in honest
    assert median_sum(honest) == honest[0]  # of two: the lower


@dataclass
class Recording:
    """A DHT that notes the keys each read asks for (to tell sums from records)."""

    dht: DHTNode
    asked: list[str] = field(default_factory=list)

    async def store(self, key: Any, value: Any, expiration: float, subkey: Any = None) -> bool:
        return await self.dht.store(key, value, expiration, subkey=subkey)

    async def store_many(self, items: list[tuple[Any, Any, Any, float]]) -> list[bool]:
        return await self.dht.store_many(items)

    async def get(self, key: Any, latest: bool = False, *, timeout: float | None = None) -> Any:
        self.asked.append(key)
        return await self.dht.get(key, latest, timeout=timeout)

    async def get_many(self, keys: list[Any], latest: bool = False, *, timeout: float | None = None) -> list[Any]:
        self.asked.extend(keys)
        return await self.dht.get_many(keys, latest, timeout=timeout)


class Swarm:
    """`peers` peers of run `run` that know the swarm's size (PEERS: 16 shards), each with
    10..80 samples at 10/s."""

    def __init__(self, node: DHTNode, peers: int = PEERS, run: str = "sums", seed: int = 8):
        self.node, self.ticks = node, Ticks()
        self.ids = peer_ids(random.Random(seed), peers)
        self.samples = [10 * (1 + i % 8) for i in range(peers)]
        self.trackers = [ProgressTracker(Recording(node), run, peer, clock=self.ticks.clock) for peer in self.ids]
        for tracker in self.trackers:
            tracker._peers = float(peers)

    async def refresh(self) -> None:
        """A second passes; every peer publishes its record and reads the swarm's."""
        self.ticks.now += 1
        for tracker, samples in zip(self.trackers, self.samples):
            await tracker.publish(epoch=1, samples=samples, samples_per_second=10.0)
        for tracker in self.trackers:
            await tracker.fetch()

    def reader(self) -> tuple[int, ProgressTracker]:
        """A peer that aggregates no shard, its calls forgotten."""
        i = next(i for i, tracker in enumerate(self.trackers) if not tracker.aggregated_levels)
        self.trackers[i].dht.asked.clear()
        return i, self.trackers[i]

    def exact(self, i: int) -> int:
        return sum(self.samples) - self.samples[i]

    def members(self, shard: int) -> list[str]:
        return [peer for peer in self.ids if shard_of(peer, SHARDS) == shard]


@pytest.fixture
async def swarm():
    node = await DHTNode.launch(validator=Unsigned())
    swarm = Swarm(node)
    for _ in range(2):  # the first read finds no sums (every shard read whole), the second the sums
        await swarm.refresh()
    yield swarm
    await node.shutdown()


async def test_a_reader_of_a_sharded_swarm_reads_the_shards_sums_only_and_counts_exactly(swarm):
    aggregators = {tracker.peer_id for tracker in swarm.trackers if tracker.aggregated_levels}
    assert aggregators == {peer for shard in range(SHARDS) for peer in designated(swarm.members(shard),
                                                                                    progress_key("sums", SHARDS, shard))}
    assert len(aggregators) == AGGREGATORS * SHARDS
    i, reader = swarm.reader()
    view = await reader.fetch()
    assert reader.dht.asked == [aggregate_key(progress_key("sums", SHARDS, s)) for s in range(SHARDS)]
    assert (view.shards, view.peers, view.reported, view.error) == (SHARDS, PEERS, swarm.exact(i), 0.0)
    records = await swarm.node.get(progress_key("sums", SHARDS, 0), latest=True)
    sums = await swarm.node.get(aggregate_key(progress_key("sums", SHARDS, 0)), latest=True)
    assert len(sums.value) == AGGREGATORS and len(records.value) > 20  # three sums, not every record


async def test_one_lying_aggregator_or_a_stranger_moves_no_reader_and_stale_sums_are_read_around(swarm):
    shard = 3
    key = progress_key("sums", SHARDS, shard)
    liar = designated(swarm.members(shard), key)[0]
    stranger = next(peer for peer in peer_ids(random.Random(9), 4000)
                    if shard_of(peer, SHARDS) != shard and peer < liar and designated([peer, liar], key)[0] == peer)
    now = swarm.ticks.clock.time()
    for publisher in (liar, stranger):  # a billion samples at a later epoch (replacing the liar's honest sum)
        assert await swarm.node.store(aggregate_key(key), a_sum(now, 1e9, epoch=7).as_value(), now + MAX_AGE + 1,
                                      subkey=owner_marker(publisher))
    found = await swarm.node.get(aggregate_key(key), latest=True)
    assert shard_sums(found, key, shard, SHARDS, now).summed.epochs.keys() == {1}  # the honest median
    i, reader = swarm.reader()
    view = await reader.fetch()
    assert (view.epoch, view.peers, view.reported) == (1, PEERS, swarm.exact(i))

    swarm.ticks.now += MAX_AGE + 1  # the aggregators stopped refreshing: their sums are stale
    reader.dht.asked.clear()
    view = await reader.fetch()
    assert [key for key in reader.dht.asked if not key.endswith(".sum")] == [progress_key("sums", SHARDS, s)
                                                                             for s in range(SHARDS)]
    assert (view.epoch, view.peers, view.reported) == (1, PEERS, swarm.exact(i))


async def test_a_newcomer_ranked_lowest_takes_over_its_shards_sums_and_the_one_it_displaced_retires(swarm):
    """A peer learns from its shard's sums that it ranks below their publishers: it reads the
    shard whole, publishes its sums, and the aggregator it displaced publishes that it stopped
    (its last sums are not counted until they expire)."""
    shard = 5
    key = progress_key("sums", SHARDS, shard)
    displaced = designated(swarm.members(shard), key)[-1]
    newcomer = next(peer for peer in peer_ids(random.Random(10), 4000)
                    if shard_of(peer, SHARDS) == shard and rank(peer, key) < rank(designated(swarm.members(shard), key)[0], key))
    tracker = ProgressTracker(Recording(swarm.node), "sums", newcomer, clock=swarm.ticks.clock)
    tracker._peers = float(PEERS)
    swarm.ids.append(newcomer)
    swarm.trackers.append(tracker)
    swarm.samples.append(10)
    await swarm.refresh()  # the newcomer reads the sums, ranks below their publishers, reads its shard whole
    await swarm.refresh()  # it publishes its shard's sums; the displaced aggregator reads them and stops
    await swarm.refresh()
    assert tracker.aggregated_levels == [4]
    found = await swarm.node.get(aggregate_key(key), latest=True)
    published = {subkey: item.value for subkey, item in found.value.items()}
    assert published[owner_marker(displaced)] == RETIRED
    live = {subkey for subkey, value in published.items() if value != RETIRED}
    assert live == {owner_marker(peer) for peer in designated(swarm.members(shard), key)}
    i, reader = swarm.reader()
    view = await reader.fetch()
    assert (view.peers, view.reported) == (PEERS + 1, swarm.exact(i))
