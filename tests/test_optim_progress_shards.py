"""Progress at swarm scale (formats/shards.py): records sharded over keys as the swarm grows, each
peer reading a sample; epochs still end on 1.0-1.2x the target, and a liar does not move them.

The swarms here are many `ProgressTracker`s on one real DHT node whose records are not signed
(one node stores every peer's record, so a thousand peers fit in a test), in virtual time.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field

import pytest

from apiary.clock import Clock
from apiary.dht import DHTNode, DHTSettings
from apiary.optim.epochs import EpochController, LocalProgress
from apiary.optim.progress import PROBE_EVERY, ProgressTracker, SwarmProgress, progress_key
from apiary.formats.aggregates import window_starts
from apiary.formats.shards import SAMPLED_SHARDS, Sample, read_level, sampled, shard_of, write_levels

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
STARTING_REFRESHES = 3  # refreshes after the joins: 800 peers that joined one by one settle on one level in three


class Unsigned:
    """Records kept as written: one node may then store any peer's record."""

    priority = 0

    def validate(self, record) -> bool:
        return True

    def sign_value(self, record) -> bytes:
        return record.value

    def strip_value(self, record) -> bytes:
        return record.value


@dataclass
class Ticks:
    """Virtual time, moved by the test; its wall time an hour ahead of the node's (which expires
    records on real time), so that records live as long as their ttl says in virtual time."""

    now: float = 0.0
    origin: float = field(default_factory=lambda: time.time() + 3600)

    @property
    def clock(self) -> Clock:
        return Clock(time=lambda: self.origin + self.now, monotonic=lambda: self.now)


def peer_ids(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(BASE32) for _ in range(52)) for _ in range(count)]


@pytest.fixture
async def node():
    node = await DHTNode.launch(validator=Unsigned())
    yield node
    await node.shutdown()


def test_peers_whose_estimates_differ_by_less_than_root_two_read_where_the_others_write():
    for reader in [1.0, 30, 45, 46, 63, 64, 90, 91, 700, 1000, 5000, 10_000, 65_000]:
        for ratio in (0.71, 0.8, 1.0, 1.2, 1.41):
            assert read_level(reader) in write_levels(reader * ratio), (reader, ratio)
    assert write_levels(8) == [0] and read_level(8) == 0  # a small swarm: one key, as ever
    assert read_level(10_000) == 8 and write_levels(10_000) == [8, 9]


def test_a_shard_splits_in_two_at_the_next_level_and_a_reader_samples_consecutive_shards():
    ids = peer_ids(random.Random(1), 2000)
    for peer in ids:
        assert shard_of(peer, 64) % 32 == shard_of(peer, 32)
    counts = [sum(1 for peer in ids if shard_of(peer, 64) == i) for i in range(64)]
    assert min(counts) > 10 and max(counts) < 55  # about 31 each
    window = sampled(ids[0], 64)
    assert len(window) == SAMPLED_SHARDS and window[0] == shard_of(ids[0], 64)
    assert sampled(ids[0], 8) == list(range(8))


def test_the_sampled_sum_is_unbiased_and_its_stated_error_is_the_error_measured():
    """Horvitz-Thompson over shards: the estimate's spread across readers is the standard error
    each states, and the count less 3.5 of them is below the truth for every reader."""
    rng = random.Random(2)
    ids = peer_ids(rng, 4096)
    values = {peer: rng.lognormvariate(math.log(100), 0.5) for peer in ids}
    truth = sum(values.values())
    shards = 128
    estimates, errors = [], []
    for start in range(shards):
        window = {(start + i) % shards for i in range(SAMPLED_SHARDS)}
        sample = Sample.of([v for peer, v in values.items() if shard_of(peer, shards) in window], SAMPLED_SHARDS / shards)
        estimates.append(sample.total)
        errors.append(sample.error)
        assert sample.total - 3.5 * sample.error < truth
    assert abs(statistics.mean(estimates) / truth - 1) < 0.01
    spread = statistics.pstdev(estimates)
    assert 0.7 < statistics.mean(errors) / spread < 1.4, (statistics.mean(errors) / truth, spread / truth)
    assert statistics.mean(errors) / truth < 0.06  # about 4.4% for 512 records read
    assert Sample.of([1.0, 2.0], 1.0) == Sample(1.0, 3.0, 0.0)  # everything read: exact


async def test_a_small_swarm_keeps_one_key_and_every_reader_counts_exactly(node):
    ticks = Ticks()
    ids = peer_ids(random.Random(3), 8)
    trackers = [ProgressTracker(node, "small", peer, clock=ticks.clock) for peer in ids]
    for _ in range(2):
        ticks.now += 1  # (a record replaces one that expires earlier)
        for i, tracker in enumerate(trackers):
            assert await tracker.publish(epoch=1, samples=10 * (i + 1), samples_per_second=5.0)
        view = await trackers[0].fetch()
        assert (view.shards, view.peers, view.reported, view.error) == (1, 8, sum(10 * i for i in range(2, 9)), 0.0)
    found = await node.get(progress_key("small"), latest=True)
    assert len(found.value) == 8  # one key holds every record


class Swarm:
    """`peers` peers (throughputs log-normal about 10 samples/s), all started: they joined one
    after the other (each writing once) and then refreshed STARTING_REFRESHES times, a second
    apart, each reading and writing, so that their estimates of the swarm's size settled."""

    def __init__(self, node: DHTNode, peers: int, seed: int):
        rng = random.Random(seed)
        self.ticks = Ticks()
        self.ids = peer_ids(rng, peers)
        self.speeds = [rng.lognormvariate(math.log(10), 0.5) for _ in self.ids]
        self.trackers = [ProgressTracker(node, "big", peer, clock=self.ticks.clock) for peer in self.ids]

    async def start(self) -> None:
        for tracker in self.trackers:
            await tracker.publish(epoch=0, samples=0, samples_per_second=0.0)
        for _ in range(STARTING_REFRESHES):
            self.ticks.now += 1
            for tracker in self.trackers:
                await tracker.fetch()
            for tracker in self.trackers:
                await tracker.publish(epoch=0, samples=0, samples_per_second=0.0)

    async def epoch(self, epoch: int, *, liar: int | None = None) -> tuple[float, int]:
        """The last 30% of an epoch of 20 s: every peer publishes every second; one reader per
        shard of its level reads every half second (the peers of a shard read the same sample).
        The exact samples of the swarm when the first reader's count reaches the target, over the
        target, and the shards of the readers' level."""
        ticks, trackers = self.ticks, self.trackers
        shards = 2 ** read_level(trackers[1]._peers)
        readers = {shard_of(peer, shards): i for i, peer in enumerate(self.ids) if i != liar}
        aggregators = [tracker for tracker in trackers if tracker.aggregated_levels]  # they read their shard every second
        samples = [v * 14 for v in self.speeds]
        target = sum(self.speeds) * 20
        for step in range(40):
            ticks.now += 0.5
            samples = [s + v * 0.5 for s, v in zip(samples, self.speeds)]
            for i, tracker in enumerate(trackers) if step % 2 == 0 else ():
                if i == liar:  # a billion samples at a billion samples per second
                    await tracker.publish(epoch=epoch, samples=10**9, samples_per_second=1e9)
                else:
                    await tracker.publish(epoch=epoch, samples=int(samples[i]), samples_per_second=self.speeds[i])
            for tracker in aggregators if step % 2 == 0 else ():
                await tracker.fetch()
            for i in readers.values():
                view = await trackers[i].fetch()
                assert view.epoch == epoch
                if samples[i] + view.reported >= target:
                    return sum(samples) / target, view.shards
        raise AssertionError("the epoch never ended")


async def test_eight_hundred_peers_read_a_sample_and_end_epochs_between_1_and_1_2_of_the_target_liar_or_not(node):
    swarm = Swarm(node, 800, seed=4)
    await swarm.start()
    ratio, shards = await swarm.epoch(1)
    assert shards == 32 and len(window_starts(0, shards)) == 2  # each peer reads two windows' sums: the whole swarm
    assert 1.0 <= ratio <= 1.2, ratio
    liar = next(i for i, peer in enumerate(swarm.ids) if shard_of(peer, shards) == 0)  # read by half the readers
    ratio, _ = await swarm.epoch(2, liar=liar)
    assert 1.0 <= ratio <= 1.2, ratio


async def test_a_key_full_to_max_subkeys_moves_its_writers_a_level_up():
    """200 peers joining a swarm whose keys hold at most 64 records: those refused by a full key
    are stored within PROBE_EVERY refreshes, and then every reader counts them all."""
    node = await DHTNode.launch(validator=Unsigned(), settings=DHTSettings(max_subkeys=64))
    ticks = Ticks()
    ids = peer_ids(random.Random(5), 200)
    trackers = [ProgressTracker(node, "full", peer, clock=ticks.clock) for peer in ids]
    stored = [await tracker.publish(epoch=0, samples=1, samples_per_second=1.0) for tracker in trackers]
    assert stored.count(False) > 0
    for _ in range(PROBE_EVERY):  # refreshes: read, write
        views = [await tracker.fetch() for tracker in trackers]
        ticks.now += 1
        stored = [await tracker.publish(epoch=0, samples=1, samples_per_second=1.0) for tracker in trackers]
        if all(stored) and {(view.peers, view.error) for view in views} == {(200, 0.0)}:
            break
    assert all(stored) and views[0].shards > 1
    assert {(view.peers, view.error) for view in views} == {(200, 0.0)}  # each reads all 16 shards or fewer
    await node.shutdown()


def test_near_an_epochs_end_a_sharded_swarm_refreshes_less_often_than_a_small_one():
    controller = EpochController(target_batch_size=1000)
    local = LocalProgress(epoch=0, samples=400, samples_per_second=10.0)
    for shards, period in [(1, 0.05), (2, 0.1), (32, 1.6), (256, 2.0)]:
        view = SwarmProgress(0, 500.0, 500.0, 100.0, 20, 0.0, shards)  # past 80% of the target
        assert controller.refresh_interval(local, view, now=0.0) == pytest.approx(period)


async def test_newcomers_read_where_a_sharded_swarm_writes_even_after_a_low_probe(node):
    """512 peers that know the swarm's size write at level 4 (16 shards) only. 200 newcomers
    learn the size from a probe of their own shard (about 32 records: now and then under 0.71×
    the mean, which points one level down, where nobody writes): after their first reads every
    one reads the 16 shards and counts the swarm within 15%."""
    ticks = Ticks()
    ids = peer_ids(random.Random(6), 712)
    for peer in ids[:512]:
        tracker = ProgressTracker(node, "told", peer, clock=ticks.clock)
        tracker._peers = 512.0
        await tracker.publish(epoch=1, samples=10, samples_per_second=1.0)
    newcomers = [ProgressTracker(node, "told", peer, clock=ticks.clock) for peer in ids[512:]]
    for tracker in newcomers:
        await tracker.publish(epoch=1, samples=10, samples_per_second=1.0)
    views = []
    for tracker in newcomers:
        for _ in range(3):
            view = await tracker.fetch()
        views.append(view)
    assert {view.shards for view in views} == {16}
    assert all(abs(view.peers / 712 - 1) < 0.15 for view in views), sorted(view.peers for view in views)
