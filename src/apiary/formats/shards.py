"""Where a run's progress records live as the swarm grows, and what a sample of them says.

A swarm of up to about `SHARD_RECORDS` × √2 peers keeps every record under one key,
`<run>.progress`, and every reader reads them all (level 0: the exact count). A larger swarm
shards them: at level ℓ there are S = 2**ℓ keys `<run>.progress.<S>.<i>`, a peer's record going
to shard `shard_of(peer id, S)`, so that each holds about `SHARD_RECORDS` records whatever the
swarm's size (far below the DHT's `max_subkeys`). A peer that estimates the swarm at N peers
writes at the two levels around log2(N / SHARD_RECORDS) (one, when that is whole or below 0)
and reads at the nearest one: peers whose estimates differ by less than a factor √2 always
find each other's records (the reader's level is the floor or the ceiling of the writer's).

A reader reads `SAMPLED_SHARDS` consecutive shards from its own (all of them, when there are
no more) and scales what it finds by S/m: every peer is in the sample with probability p = m/S,
so `Sample.total` is the Horvitz–Thompson estimate of the swarm's sum, unbiased, with standard
error √((1-p)·Σx²)/p over the sampled values x (0 when everything is read). With n records read
and peers of about equal throughput that is about √((1-p)/n) of the sum: 4.4% for the ~512
records read at SAMPLED_SHARDS × SHARD_RECORDS (tests/test_optim_shards.py measures it). Where the
shards' aggregators publish the sums of windows of SAMPLED_SHARDS shards (formats/aggregates.py),
a reader counts SAMPLED_SHARDS windows instead, from its own: every shard up to 256 of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

SHARD_RECORDS = 32  # a shard key is meant to hold about this many records
SAMPLED_SHARDS = 16  # a reader reads this many shards (about SHARD_RECORDS × this many records)
MAX_LEVEL = 12  # the most shards: 4096 (about 130,000 peers at SHARD_RECORDS)


def level_of(peers: float) -> float:
    """The ideal level (log2 of the number of shards) for a swarm of `peers`, 0 for small ones."""
    return max(0.0, math.log2(max(peers, 1.0) / SHARD_RECORDS))


def write_levels(peers: float) -> list[int]:
    """The levels a peer that estimates the swarm at `peers` writes its record at."""
    level = level_of(peers)
    return sorted({math.floor(level), math.ceil(level)})


def read_level(peers: float) -> int:
    """The level a peer that estimates the swarm at `peers` reads at."""
    return math.floor(level_of(peers) + 0.5)


def shard_of(peer_id: str, shards: int) -> int:
    """The shard of a peer's record among `shards` (a power of two: a shard at 2S is one half of
    the shard at S that holds the same peers)."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big") % shards


def sampled(peer_id: str, shards: int) -> list[int]:
    """The shards a peer reads: `SAMPLED_SHARDS` consecutive ones from its own (all, if fewer)."""
    if shards <= SAMPLED_SHARDS:
        return list(range(shards))
    first = shard_of(peer_id, shards)
    return [(first + i) % shards for i in range(SAMPLED_SHARDS)]


@dataclass(frozen=True)
class Sample:
    """The sum of a value over the swarm, from the values of the sampled peers."""

    fraction: float  # p: the share of the swarm's peers in the sample (1: all of them)
    total: float  # Σx / p
    error: float  # its standard error, √((1-p)·Σx²) / p

    @classmethod
    def of(cls, values: Iterable[float], fraction: float) -> Sample:
        values = list(values)
        return cls.of_sums(sum(values), sum(v * v for v in values), fraction)

    @classmethod
    def of_sums(cls, total: float, squares: float, fraction: float) -> Sample:
        """From the sample's Σx and Σx² (a shard's sums, formats/aggregates.py)."""
        return cls(fraction, total / fraction, math.sqrt(max(0.0, 1.0 - fraction) * squares) / fraction)
