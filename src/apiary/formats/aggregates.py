"""Shard sums: what a few members of a progress shard publish so that a reader of a sharded
swarm reads a few hundred bytes per shard instead of every record of it (formats/shards.py).

A shard's members are ranked by a hash of their peer id and the shard's key (`rank`); the
`AGGREGATORS` lowest (`designated`) read the shard whole at each refresh, bound each record as a
reader bounds it (optim/progress.py) and publish the shard's sums under `<shard key>.sum`, subkey
their owner marker, so that each signs its own: when they read it, its live records, the two
newest epochs among them and, for each of its two newest epochs, the records at it and the sums
of their reported samples, of those squared (for the sample's standard error), of their samples
extrapolated to the reading and of their throughputs.

A reader keeps, of a shard's published sums, the valid ones of publishers that belong to the
shard, no older than `MAX_AGE`, and of those the `AGGREGATORS` of the lowest rank, and counts
their median (`median_sum`, by the newest epochs, then the samples at the newest): one lying
aggregator cannot move it past an honest one's (two of three can). A shard with no such sum is
read whole. A shard key is then read by its few aggregators, not by every reader whose sample
holds it (~512 at any size), and a sum is ~16 times smaller than the shard's records.

Past `WINDOW` (16) shards an aggregator also publishes, inside its sum, the sum of its window:
the WINDOW consecutive shards from its own, as it read them as a reader (its own shard whole,
the others' medians), extrapolated to its reading (`merged`). A reader then reads the sums of
the windows from its own shard on, one key every WINDOW shards (`window_starts`): up to 256
shards (~8,000 peers) SAMPLED_SHARDS keys cover every shard, and a window's sum counts for the
readers of 16 shards' keys, so that a reader's sample, and with it its error, no longer shrinks
as the swarm grows while each key keeps the same readers (~SAMPLED_SHARDS × SHARD_RECORDS).
It counts a window where most of the chosen publishers publish one, by their median (one liar
cannot move it); where none is usable it counts that shard's own sum, and its own window, where
none is usable, shard by shard as without windows. A window lags a refresh more than a shard's
sum (it sums the sums of the refresh before).

A member learns that it is one of the aggregators from its shard's records when it reads them,
or from its shard's sums (`Published.outranked_by`: it ranks below one of their publishers, or
fewer than AGGREGATORS publish); one that stops publishes `RETIRED` in place of its sums.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any

from apiary.formats.progress import PeerProgress, record_owner
from apiary.formats.shards import SAMPLED_SHARDS, shard_of

AGGREGATORS = 3  # members of a shard that publish its sums
MAX_AGE = 6.0  # seconds: an older sum is stale (three of the longest refresh periods, optim/epochs.py)
MAX_SUMMED_EPOCHS = 2  # a sum holds the sums of its records' newest epochs, this many
WINDOW = SAMPLED_SHARDS  # the shards a window's sum covers: an aggregator's shard and the next ones
RETIRED = {"retired": True}  # what an aggregator that stopped publishes in place of its last sums (no sum)


def aggregate_key(shard_key: str) -> str:
    """The key a shard's sums are published under."""
    return f"{shard_key}.sum"


def rank(peer_id: str, shard_key: str) -> bytes:
    """A member's place among a shard's aggregators: the lowest AGGREGATORS are designated."""
    return hashlib.sha256(f"{shard_key}|{peer_id}".encode()).digest()


def designated(peer_ids: list[str], shard_key: str) -> list[str]:
    """The members of a shard (by the records read of it) that publish its sums."""
    return sorted(set(peer_ids), key=lambda peer: rank(peer, shard_key))[:AGGREGATORS]


@dataclass(frozen=True)
class EpochSum:
    """The sums of a shard's records at one epoch, each record bounded as a reader bounds it."""

    count: int
    reported: float  # Σ reported samples
    squares: float  # Σ reported samples²
    samples: float  # Σ samples extrapolated to the reading
    speed: float  # Σ throughputs

    def without(self, record: PeerProgress) -> EpochSum:
        """These sums less one record's own figures (a reader's own, which it does not count)."""
        return EpochSum(max(0, self.count - 1), max(0.0, self.reported - record.samples),
                        max(0.0, self.squares - float(record.samples) ** 2), max(0.0, self.samples - record.samples),
                        max(0.0, self.speed - record.samples_per_second))


@dataclass(frozen=True)
class ShardSum:
    """A shard, or a window of `shards` consecutive shards, as one member read it at `time`
    (unix time); a shard's sum may carry the sum of the window that starts at it (`window`)."""

    time: float
    peers: int  # live records, at any epoch
    newest: tuple[int, ...]  # the two newest epochs its records report (one each; fewer with fewer records)
    epochs: dict[int, EpochSum]  # the sums at its MAX_SUMMED_EPOCHS newest epochs
    shards: int = 1  # the shards it covers
    window: ShardSum | None = None  # the sum of the WINDOW shards from this one (a shard's sum only)

    def as_value(self) -> dict[str, Any]:
        value = {"time": self.time, "peers": self.peers, "newest": list(self.newest),
                 "epochs": [[epoch, s.count, s.reported, s.squares, s.samples, s.speed] for epoch, s in self.epochs.items()]}
        if self.shards != 1:
            value["shards"] = self.shards
        if self.window is not None:
            value["window"] = self.window.as_value()
        return value

    @classmethod
    def from_value(cls, value: Any, *, nested: bool = False) -> ShardSum | None:
        """The sum, or None for a malformed one (other peers' sums are untrusted input); a
        malformed window is dropped, the shard's own sum kept."""
        if not isinstance(value, dict):
            return None
        try:
            peers, newest, time = int(value["peers"]), tuple(int(e) for e in value["newest"]), float(value["time"])
            epochs = {int(row[0]): EpochSum(int(row[1]), *(float(x) for x in row[2:6])) for row in value["epochs"]}
            rows, shards = len(value["epochs"]), int(value.get("shards", 1))
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        figures = [x for s in epochs.values() for x in (s.reported, s.squares, s.samples, s.speed)]
        if (not math.isfinite(time) or peers < 0 or len(newest) != min(2, peers) or min(newest, default=0) < 0
                or len(epochs) != rows or len(epochs) > MAX_SUMMED_EPOCHS
                or any(not math.isfinite(x) or x < 0 for x in figures)
                or any(s.count < 0 for s in epochs.values()) or sum(s.count for s in epochs.values()) > peers
                or shards != (WINDOW if nested else 1)):
            return None
        window = None if nested or "window" not in value else cls.from_value(value["window"], nested=True)
        return cls(time, peers, newest, epochs, shards, window if window is not None and window.time == time else None)

    def without(self, record: PeerProgress) -> ShardSum:
        """This sum less a record the reader counts apart (its own) at the record's epoch."""
        if record.epoch not in self.epochs:
            return self
        return replace(self, epochs={**self.epochs, record.epoch: self.epochs[record.epoch].without(record)})


def window_starts(first: int, shards: int) -> list[int]:
    """The shards whose windows a reader of more than WINDOW shards reads: `first` (its own) and
    every WINDOW-th after it, at most SAMPLED_SHARDS of them (every shard, up to 256 shards)."""
    return [(first + i * WINDOW) % shards for i in range(min(SAMPLED_SHARDS, shards // WINDOW))]


def merged(sums: list[ShardSum], time: float, max_extrapolation: float) -> ShardSum:
    """Several sums as one at `time`: their records, their two newest epochs and their sums at
    those, samples extrapolated from each sum's time (by at most `max_extrapolation` seconds)."""
    newest = tuple(sorted((epoch for s in sums for epoch in s.newest), reverse=True)[:2])
    epochs: dict[int, EpochSum] = {}
    for epoch in sorted({epoch for s in sums for epoch in s.epochs}, reverse=True)[:MAX_SUMMED_EPOCHS]:
        at = [(s.epochs[epoch], min(max(0.0, time - s.time), max_extrapolation)) for s in sums if epoch in s.epochs]
        epochs[epoch] = EpochSum(sum(e.count for e, _ in at), sum(e.reported for e, _ in at),
                                 sum(e.squares for e, _ in at), sum(e.samples + e.speed * since for e, since in at),
                                 sum(e.speed for e, _ in at))
    return ShardSum(time, sum(s.peers for s in sums), newest, epochs, sum(s.shards for s in sums))


def median_sum(sums: list[ShardSum]) -> ShardSum:
    """The middle of a shard's sums (the lower of two) by their newest epochs, then the samples
    reported at the newest: a sum that claims more, or less, than the others is not counted."""
    def order(s: ShardSum) -> tuple[tuple[int, ...], float]:
        top = s.epochs.get(s.newest[0]) if s.newest else None
        return s.newest, top.reported if top else 0.0

    return sorted(sums, key=order)[(len(sums) - 1) // 2]


@dataclass(frozen=True)
class Published:
    """What a reader counts of a shard (`summed`: the median of its chosen sums) and the ranks of
    the publishers it chose them from, lowest first."""

    summed: ShardSum
    ranks: list[bytes]
    window: ShardSum | None = None  # the median of the chosen publishers' windows, where most have one

    def outranked_by(self, peer_id: str, shard_key: str) -> bool:
        """Whether a member of the shard should be one of its aggregators by these publishers:
        fewer than AGGREGATORS publish, or it ranks below one of them (so that members that
        should aggregate learn it from the sums, not only from reading the shard)."""
        return len(self.ranks) < AGGREGATORS or rank(peer_id, shard_key) < self.ranks[-1]


def shard_sums(found: Any, shard_key: str, index: int, shards: int, now: float) -> Published | None:
    """The median of a shard's sums as published (`found`: the lookup of its aggregate key), or
    None where none is usable (missing, malformed, stale, or from peers outside the shard)."""
    if found is None or not isinstance(found.value, dict):
        return None
    valid: list[tuple[bytes, ShardSum]] = []
    for subkey, item in found.value.items():
        publisher = record_owner(subkey)
        if publisher is None or shard_of(publisher, shards) != index:
            continue
        summed = ShardSum.from_value(getattr(item, "value", None))
        if summed is not None and now - MAX_AGE <= summed.time:
            valid.append((rank(publisher, shard_key), summed))
    if not valid:
        return None
    chosen = sorted(valid, key=lambda pair: pair[0])[:AGGREGATORS]
    windows = [summed.window for _, summed in chosen if summed.window is not None]
    return Published(median_sum([summed for _, summed in chosen]), [ranked for ranked, _ in chosen],
                     median_sum(windows) if len(windows) > len(chosen) // 2 else None)
