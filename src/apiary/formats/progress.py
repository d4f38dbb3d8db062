"""A run's progress records: their keys, their value, and reading them back.

Every training peer keeps a record under its run's progress key(s), subkey its owner marker (so
only it can write it): epoch, samples toward that epoch, throughput, time, client or not. A
small swarm keeps them all under `<run>.progress`; a large one shards them (`shards`).
`apiary.optim.progress.ProgressTracker` writes them and reads a sample; `read_whole()` reads every
record of a run, for a view of the whole swarm (the monitor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from apiary.dht.interface import DHTLike
from apiary.formats.shards import MAX_LEVEL, shard_of


def progress_key(run_id: str, shards: int = 1, index: int = 0) -> str:
    """The key of shard `index` of `shards` (one shard: the run's one progress key)."""
    return f"{run_id}.progress" if shards == 1 else f"{run_id}.progress.{shards}.{index}"


@dataclass(frozen=True)
class PeerProgress:
    """One peer's record."""

    peer_id: str
    epoch: int
    samples: int
    samples_per_second: float
    reported_at: float  # unix time
    client: bool = False

    def as_value(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples": self.samples, "sps": self.samples_per_second,
                "time": self.reported_at, "client": self.client}

    @classmethod
    def from_value(cls, peer_id: str, value: Any) -> PeerProgress | None:
        """The record, or None for a malformed one (other peers' records are untrusted input)."""
        if not isinstance(value, dict):
            return None
        try:
            progress = cls(peer_id, int(value["epoch"]), int(value["samples"]), float(value["sps"]),
                           float(value["time"]), bool(value.get("client", False)))
        except (KeyError, TypeError, ValueError):
            return None
        if progress.epoch < 0 or progress.samples < 0 or not (math.isfinite(progress.samples_per_second)
                                                              and progress.samples_per_second >= 0):
            return None
        return progress


def shard_records(found: list[Any], indices: list[int], shards: int) -> list[PeerProgress]:
    """The valid records of the shards read (`found[i]`: the lookup of shard `indices[i]` of
    `shards`), each from the shard its peer belongs to."""
    records = []
    for index, shard in zip(indices, found):
        if shard is None or not isinstance(shard.value, dict):
            continue
        for subkey, item in shard.value.items():
            peer_id = record_owner(subkey)
            record = PeerProgress.from_value(peer_id, getattr(item, "value", None)) if peer_id else None
            if record is not None and shard_of(record.peer_id, shards) == index:
                records.append(record)
    return records


def swarm_epoch(records: list[PeerProgress]) -> int:
    """The newest epoch two peers report (the newest one reported, in a swarm of one or two)."""
    epochs = sorted((r.epoch for r in records), reverse=True)
    if not epochs:
        return 0
    return epochs[1] if len(epochs) > 2 else epochs[0]


async def read_whole(dht: DHTLike, run_id: str, *, timeout: float | None = None) -> list[PeerProgress]:
    """Every record of the run, by peer id: shard 0 of every level tells which levels peers write
    at now (records expire), then every shard of those levels is read; a peer found at several
    levels counts once, with its newest record. (A level only a few peers write at, none of them
    in shard 0, is missed: writers agree on their levels within a factor √2, so a level in use
    has about `SHARD_RECORDS` records in each shard.)"""
    probed = await dht.get_many([progress_key(run_id, 2**level, 0) for level in range(MAX_LEVEL + 1)],
                                latest=True, timeout=timeout)
    levels = [level for level, found in enumerate(probed) if level and shard_records([found], [0], 2**level)]
    keys = [(2**level, index) for level in levels for index in range(1, 2**level)]
    found = await dht.get_many([progress_key(run_id, shards, index) for shards, index in keys],
                               latest=True, timeout=timeout) if keys else []
    read = [(1, 0, probed[0]), *((2**level, 0, probed[level]) for level in levels),
            *((shards, index, item) for (shards, index), item in zip(keys, found))]
    newest: dict[str, PeerProgress] = {}
    for shards, index, item in read:
        for record in shard_records([item], [index], shards):
            known = newest.get(record.peer_id)
            if known is None or (record.reported_at, record.epoch) > (known.reported_at, known.epoch):
                newest[record.peer_id] = record
    return [newest[peer_id] for peer_id in sorted(newest)]


def record_owner(subkey: Any) -> str | None:
    """The peer whose owner marker `subkey` is (None: not an owner marker)."""
    if isinstance(subkey, str) and subkey.startswith("[owner:") and subkey.endswith("]"):
        return subkey[len("[owner:"):-1]
    return None
