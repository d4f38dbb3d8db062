"""Training progress of a run, shared through the DHT.

Every peer publishes a signed record under `<run_id>.progress` (subkey: its owner marker, so
only it can write it): its epoch, the samples it accumulated toward that epoch and its
throughput. Any peer reads all records and derives the swarm's view: the swarm's epoch (the
newest epoch any live peer reports), the samples accumulated toward it (reported counts plus
each peer's throughput times the time since it reported) and the estimated time until the
target batch size is reached.

A peer cannot push the swarm forward alone by lying: the swarm's epoch is the newest that two
peers report (one, in a swarm of two), and a reader counts no more of a peer's samples than
`throughput_slack` times the swarm's median throughput (and at most `max_samples_per_second`)
allows since it first saw that peer in the epoch.

The records' format and keys are `apiary.formats.progress` (torch-free, for the monitor too).
A large swarm shards the records over several keys and each peer reads a sample of them
(formats/shards.py); a swarm of up to ~45 peers keeps one key and every peer reads all of it,
exactly. A sampled reader scales its sums by the share of the swarm it read and counts, as
reported, its estimate less `CONFIDENCE` standard errors, so that an epoch still ends on at
least the target: the sums are exact with one key, and with a sample they err by about
√((1-p)/n) of the count for n records read, a share p of the swarm (4.4% for the default ~512
records, of which `CONFIDENCE` = 3.5 takes 15% off). A liar's record counts as in a full read,
bounded, and is scaled like any other: it moves a reader's estimate by at most its bounded share
of the records read; a record in a shard its peer id does not belong to is ignored.

A sharded reader reads each shard's sums rather than its records: the shard's aggregators (its
three lowest-ranked members) read it whole at each refresh, bound its records as above and
publish the sums, and the reader counts their median (formats/aggregates.py); a shard without
usable sums is read whole, by the same rules. Past 16 shards the aggregators publish the sums
of the 16 shards from theirs too (a window), and a reader reads the windows from its own shard
on, one key in 16: up to 256 shards its count is exact but for the windows' lag.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

from apiary.clock import REAL, Clock
from apiary.dht.interface import DHTLike
from apiary.dht.validation import owner_marker
from apiary.formats.aggregates import (MAX_AGE, MAX_SUMMED_EPOCHS, RETIRED, WINDOW, EpochSum, Published, ShardSum,
                                       aggregate_key, designated, merged, shard_sums, window_starts)
from apiary.formats.progress import PeerProgress, progress_key, shard_records
from apiary.formats.shards import MAX_LEVEL, Sample, read_level, sampled, shard_of, write_levels
from apiary.wire import WireError


GRACE_SECONDS = 5.0  # a peer first seen mid-epoch may have counted this long before we saw it
MAX_EXTRAPOLATION = 5.0  # seconds: a record older than that is from a peer that stalled or left
CONFIDENCE = 3.5  # a sampled reader counts as reported its estimate less this many standard errors
PROBE_EVERY = 16  # reads between two looks at every level
SUSPICIOUS = 0.5  # a read that finds less than this share of the records its estimate implies reads again
PROBE_RECORDS = 8  # a probed level implies the swarm's size from this many records of the peer's shard up


def implied_size(probed: list[list[PeerProgress]]) -> tuple[float, int]:
    """The swarm's size a probe of a peer's shard at every level implies, and the level that
    implies it: the largest count a level implies (records × shards) among the levels where
    the shard holds PROBE_RECORDS records or more (two or more, where none does), so that
    peers whose estimates drifted apart (a swarm that grew fast) all move to the largest and
    find each other again, and a level that only a few peers write at does not count."""
    for least in (PROBE_RECORDS, 2):
        implied = [(len(records) * 2.0**level, level) for level, records in enumerate(probed) if len(records) >= least]
        if implied:
            return max(implied)
    return max(1.0, len(probed[0])), 0


@dataclass(frozen=True)
class SwarmProgress:
    """The swarm's state toward its next epoch, as seen at `fetched_at` (monotonic time)."""

    epoch: int
    samples: float  # accumulated toward `epoch` by the other peers (own samples excluded)
    reported: float  # the part of `samples` the peers reported (no extrapolation)
    samples_per_second: float  # the other peers' throughput at `epoch`
    peers: int  # live peers (including clients), at any epoch
    fetched_at: float
    shards: int = 1  # the progress keys the reader's level has (1: it read every record)
    error: float = 0.0  # the standard error of the estimate that `reported` is CONFIDENCE of them below

    def others_now(self, now: float | None = None) -> float:
        """The other peers' samples toward `epoch`, extrapolated to `now` (monotonic time)."""
        elapsed = min(max(0.0, (now if now is not None else time.monotonic()) - self.fetched_at), MAX_EXTRAPOLATION)
        return self.samples + self.samples_per_second * elapsed


@dataclass
class ProgressTracker:
    """Publishes this peer's progress and reads the swarm's (call from one event loop)."""

    dht: DHTLike
    run_id: str
    peer_id: str
    client: bool = False
    ttl: float = 30.0
    max_samples_per_second: float = math.inf
    throughput_slack: float = 4.0  # a peer may be this many times faster than the median peer
    clock: Clock = REAL
    _first_seen: dict[tuple[str, int], float] = field(default_factory=dict)
    _own_epoch: int = 0
    _peers: float | None = None  # the swarm's size, as the latest read estimated it (None: not read yet)
    _reads: int = 0
    _aggregating: set[int] = field(default_factory=set)  # the levels this peer publishes its shard's sums at
    _summing: set[int] = field(default_factory=set)  # the levels of its latest sums
    _published: PeerProgress | None = None  # this peer's latest record

    @property
    def subkey(self) -> str:
        return owner_marker(self.peer_id)

    async def publish(self, epoch: int, samples: int, samples_per_second: float) -> bool:
        """Stores this peer's record (signed by the DHT node that stores it) in its shard at each
        of its levels. A peer that has not read yet learns the swarm's size first (so that a
        newcomer does not write to the one key of a large swarm). A shard full to the DHT's
        `max_subkeys` means a larger swarm than thought: False, and the next read learns the
        swarm's size anew (`_read`)."""
        if self._peers is None:
            await self._read()
        now = self.clock.time()
        self._own_epoch = epoch
        self._published = PeerProgress(self.peer_id, epoch, samples, samples_per_second, now, self.client)
        value = self._published.as_value()
        levels = write_levels(self._peers or 1.0)
        keys = [self._own_shard(level) for level in levels]
        try:
            if len(keys) == 1:
                return await self.dht.store(keys[0], value, now + self.ttl, subkey=self.subkey)
            return any(await self.dht.store_many([(key, self.subkey, value, now + self.ttl) for key in keys]))
        except (ValueError, WireError) as e:
            if "max_subkeys" not in str(e):
                raise
            self._peers = None
            return False

    @property
    def aggregated_levels(self) -> list[int]:
        """The levels this peer writes at whose shard's sums it publishes (formats/aggregates.py)."""
        return sorted(self._aggregating & set(write_levels(self._peers or 1.0)))

    def _own_shard(self, level: int) -> str:
        return progress_key(self.run_id, 2**level, shard_of(self.peer_id, 2**level))

    async def _read(self) -> tuple[list[ShardSum], int, float]:
        """The sums of this peer's sample of shards at its level (its own record left out), the
        level's number of shards and the share of the swarm's records the sample holds. The first
        read, one after a read that found nothing and every PROBE_EVERY-th learn the swarm's size
        from a probe (`_probe`). A read that finds far fewer records than the estimate implies
        (SUSPICIOUS) reads again at the level the probe finds them at: the swarm shrank, or this
        peer's estimate fell between the levels the others write at (a probe of ~32 records errs
        by ~18%), where it would find none but the few peers misled like it and sink with them."""
        probed: list[list[PeerProgress]] | None = None
        self._reads += 1
        if self._peers is None or self._reads % PROBE_EVERY == 0:
            probed = await self._probe()
            self._peers = implied_size(probed)[0]
        sums, shards, fraction = await self._sample(read_level(self._peers), probed)
        if _records(sums) < SUSPICIOUS * self._peers * fraction:
            probed = probed or await self._probe()
            level = implied_size(probed)[1]
            if 2**level != shards:
                sums, shards, fraction = await self._sample(level, probed)
        if _records(sums):
            self._peers = _records(sums) / fraction
        elif probed is None:  # (after a probe: the peers move up to the level it found at their next publication)
            self._peers = None
        for level, records in enumerate(probed or []):  # (by the levels the estimate now writes at)
            self._note_aggregators(level, records)
        return sums, shards, fraction

    async def _probe(self) -> list[list[PeerProgress]]:
        """This peer's shard at every level up to MAX_LEVEL: the valid records of each."""
        found = await self.dht.get_many([self._own_shard(level) for level in range(MAX_LEVEL + 1)], latest=True)
        return [shard_records([shard], [shard_of(self.peer_id, 2**level)], 2**level) for level, shard in enumerate(found)]

    async def _sample(self, level: int, probed: list[list[PeerProgress]] | None) -> tuple[list[ShardSum], int, float]:
        """The sums of this peer's sample of shards at `level`: each shard's published sums
        (formats/aggregates.py), or its records where it has none usable, or where this peer has
        just read them (its own shard, probed or aggregated). Past WINDOW shards the sample is
        the windows from its own shard on (`window_starts`), each counted by its window's sum
        where most of its aggregators publish one, else by the shard's own sum or records.
        Publishes the sums of the shards it aggregates (and, at this level, of its window: the
        sums of the consecutive shards from its own). Level 0: the one key, read whole (as probed
        if it was)."""
        shards = 2**level
        if shards == 1:
            if probed is None:
                probed = [shard_records([await self.dht.get(progress_key(self.run_id), latest=True)], [0], 1)]
            return [self._summed(probed[0], exclude=self.peer_id)], 1, 1.0
        own_index = shard_of(self.peer_id, shards)
        windowed = shards > WINDOW
        consecutive = sampled(self.peer_id, shards)  # from its own shard on, when windowed
        starts = window_starts(own_index, shards) if windowed else consecutive
        aggregating = self.aggregated_levels
        summing = windowed and level in aggregating  # it publishes its window's sums: it reads them all
        unread = aggregating if probed is None else []
        first = sorted({*starts, *(consecutive if summing else ())})
        found = await self.dht.get_many([aggregate_key(self._shard_key(shards, index)) for index in first]
                                        + [self._own_shard(at) for at in unread], latest=True)
        now = self.clock.time()
        own = {at: shard_records([shard], [shard_of(self.peer_id, 2**at)], 2**at)
               for at, shard in zip(unread, found[len(first):])}
        if probed is not None:
            own = {at: probed[at] for at in {*aggregating, level}}
        published = {index: self._published_sums(shard, index, shards, now) for index, shard in zip(first, found)}
        own_published = published[own_index]
        own_window = own_published.window if windowed and own_published is not None else None
        if windowed and own_window is None and not summing:  # its own window, shard by shard
            rest = [index for index in consecutive if index not in published]
            found = await self.dht.get_many([aggregate_key(self._shard_key(shards, index)) for index in rest], latest=True)
            published |= {index: self._published_sums(shard, index, shards, now) for index, shard in zip(rest, found)}
        sums = {index: chosen.summed if chosen else None for index, chosen in published.items()}
        if level in own:
            sums[own_index] = self._summed(own[level], exclude=self.peer_id)
        elif own_published is not None and own_published.outranked_by(self.peer_id, self._shard_key(shards, own_index)):
            sums[own_index] = None  # read whole: this peer may be one of the shard's aggregators
        elif own_published is not None and self._published is not None:  # its sums count this peer's own record
            sums[own_index] = own_published.summed.without(self._published)
        whole = consecutive if own_window is None or summing else [own_index]  # read whole where they have no sum
        missing = [index for index in whole if sums[index] is None]
        if missing:
            read = await self.dht.get_many([self._shard_key(shards, index) for index in missing], latest=True)
            for index, shard in zip(missing, read):
                records = shard_records([shard], [index], shards)
                sums[index] = self._summed(records, exclude=self.peer_id)
                if index == own_index:
                    self._note_aggregators(level, records)
        await self._publish_sums(own, aggregating, self._window_sums(level, own, sums, consecutive) if summing else {})
        if own_window is None:
            counted = [summed for index in consecutive if (summed := sums[index]) is not None]
        else:
            counted = [own_window.without(self._published) if self._published is not None else own_window]
        for index in starts[1:] if windowed else ():  # the other windows: by their sums where published
            if (chosen := published[index]) is not None:
                counted.append(chosen.window or chosen.summed)
        return counted, shards, sum(summed.shards for summed in counted) / shards

    def _shard_key(self, shards: int, index: int) -> str:
        return progress_key(self.run_id, shards, index)

    def _published_sums(self, found: Any, index: int, shards: int, now: float) -> Published | None:
        return shard_sums(found, self._shard_key(shards, index), index, shards, now)

    def _window_sums(self, level: int, own: dict[int, list[PeerProgress]], sums: dict[int, ShardSum | None],
                     window: list[int]) -> dict[int, ShardSum]:
        """This peer's shard's sums at `level` with its window's attached, where it aggregates
        the level and every shard of its window has a sum (a window with a gap is not published)."""
        if any(sums[index] is None for index in window[1:]):
            return {}
        mine = self._summed(own[level])
        rest = [summed for index in window[1:] if (summed := sums[index]) is not None]
        return {level: replace(mine, window=merged([mine, *rest], mine.time, MAX_EXTRAPOLATION))}

    def _note_aggregators(self, level: int, records: list[PeerProgress]) -> None:
        """Whether this peer is one of its shard's aggregators at `level`, by the records read of
        it (only at a level it writes at: a level's members are known from a level in use)."""
        members = [record.peer_id for record in records] + [self.peer_id]
        if level and level in write_levels(self._peers or 1.0) and self.peer_id in designated(members, self._own_shard(level)):
            self._aggregating.add(level)
        else:
            self._aggregating.discard(level)

    async def _publish_sums(self, own: dict[int, list[PeerProgress]], aggregating: list[int],
                            ready: dict[int, ShardSum]) -> None:
        """Publishes the sums of this peer's shard at the levels it aggregates (read just now;
        `ready`: those summed already, with their window), and that it stopped at the levels it
        no longer does (its last sums would be counted until they expire, growing staler)."""
        self._aggregating &= set(write_levels(self._peers or 1.0))
        for at in aggregating:
            self._note_aggregators(at, own[at])
        levels = [at for at in aggregating if at in self._aggregating]
        retired, self._summing = self._summing - set(levels), set(levels)
        expiration = self.clock.time() + MAX_AGE
        items = [(aggregate_key(self._own_shard(at)), self.subkey, (ready.get(at) or self._summed(own[at])).as_value(),
                  expiration) for at in levels]
        items += [(aggregate_key(self._own_shard(at)), self.subkey, RETIRED, expiration) for at in retired]
        if items:
            await self.dht.store_many(items)

    def _summed(self, records: list[PeerProgress], *, exclude: str | None = None) -> ShardSum:
        """The sums of a shard's records now, each bounded (`_bound`), at its two newest epochs,
        less the records of `exclude` (they still count as live records and for the epochs)."""
        now_unix, now = self.clock.time(), self.clock.monotonic()
        epochs: dict[int, EpochSum] = {}
        for epoch in sorted({r.epoch for r in records}, reverse=True)[:MAX_SUMMED_EPOCHS]:
            current = [r for r in records if r.epoch == epoch]
            median_speed = statistics.median(r.samples_per_second for r in current)
            reported, samples, speed = [], [], []
            for record in current:
                if record.peer_id == exclude:
                    continue
                since = min(max(0.0, now_unix - record.reported_at), MAX_EXTRAPOLATION)
                bound = self._bound(record, now, median_speed)
                samples.append(min(record.samples + record.samples_per_second * since, bound))
                reported.append(min(record.samples, bound))
                speed.append(min(record.samples_per_second, self.max_samples_per_second))
            epochs[epoch] = EpochSum(len(reported), sum(reported), sum(x * x for x in reported), sum(samples), sum(speed))
        newest = tuple(sorted((r.epoch for r in records), reverse=True)[:2])
        return ShardSum(now_unix, len(records), newest, epochs)

    async def fetch(self) -> SwarmProgress:
        """The swarm's view from the sums of this peer's sample of shards (own record excluded
        from the sums), extrapolated from when each was read."""
        sums, shards, fraction = await self._read()
        now_unix, now = self.clock.time(), self.clock.monotonic()
        if not _records(sums):
            return SwarmProgress(0, 0.0, 0.0, 0.0, 0, now, shards)
        total = merged(sums, now_unix, MAX_EXTRAPOLATION)
        # the newest epoch two peers report (ours counts as one), or ours if we are ahead of that
        epoch = max(total.newest[1] if total.peers > 2 and len(total.newest) > 1 else total.newest[0], self._own_epoch)
        at = total.epochs.get(epoch, EpochSum(0, 0.0, 0.0, 0.0, 0.0))
        counted = Sample.of_sums(at.reported, at.squares, fraction)
        return SwarmProgress(epoch, at.samples / fraction, max(0.0, counted.total - CONFIDENCE * counted.error),
                             at.speed / fraction, round(total.peers / fraction), now, shards, counted.error)

    def _bound(self, record: PeerProgress, now: float, median_speed: float) -> float:
        """The most samples this peer can have made in this epoch: the plausible throughput (the
        swarm's median times the slack, capped by `max_samples_per_second`) times the time since
        we first saw it there, plus a few seconds of grace."""
        rate = min(self.max_samples_per_second, self.throughput_slack * median_speed)
        if median_speed <= 0 and math.isinf(self.max_samples_per_second):
            return math.inf  # nobody has a throughput yet (the run is starting): nothing to compare to
        seen_at = self._first_seen.setdefault((record.peer_id, record.epoch), now)
        if len(self._first_seen) > 4096:  # forget old epochs
            for key in [k for k in self._first_seen if k[1] < record.epoch - 1]:
                del self._first_seen[key]
        return rate * (now - seen_at + GRACE_SECONDS)


def _records(sums: list[ShardSum]) -> int:
    return sum(summed.peers for summed in sums)
