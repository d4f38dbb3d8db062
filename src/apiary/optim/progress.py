"""Training progress of a run, shared through the DHT.

Every peer publishes a signed record under `<run_id>.progress` (subkey: its owner marker, so
only it can write it): its epoch, the samples it accumulated toward that epoch and its
throughput. Any peer reads all records and derives the swarm's view: the swarm's epoch (the
newest epoch any live peer reports), the samples accumulated toward it (reported counts plus
each peer's throughput times the time since it reported) and the estimated time until the
target batch size is reached.

A peer cannot push the epoch forward alone by lying about its samples: a reader bounds each
peer's claimed count by what `max_samples_per_second` allows since the reader first saw that
peer in this epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from apiary.dht.interface import DHTLike
from apiary.dht.validation import owner_marker


MAX_EXTRAPOLATION = 5.0  # seconds: a record older than that is from a peer that stalled or left


def progress_key(run_id: str) -> str:
    return f"{run_id}.progress"


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


@dataclass(frozen=True)
class SwarmProgress:
    """The swarm's state toward its next epoch, as seen at `fetched_at` (monotonic time)."""

    epoch: int
    samples: float  # accumulated toward `epoch` by the other peers (own samples excluded)
    reported: float  # the part of `samples` the peers reported (no extrapolation)
    samples_per_second: float  # the other peers' throughput at `epoch`
    peers: int  # live peers (including clients), at any epoch
    fetched_at: float

    def others_now(self, now: float | None = None) -> float:
        """The other peers' samples toward `epoch`, extrapolated to `now`."""
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
    _first_seen: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def subkey(self) -> str:
        return owner_marker(self.peer_id)

    async def publish(self, epoch: int, samples: int, samples_per_second: float) -> bool:
        """Stores this peer's record (signed by the DHT node that stores it)."""
        now = time.time()
        record = PeerProgress(self.peer_id, epoch, samples, samples_per_second, now, self.client)
        return await self.dht.store(progress_key(self.run_id), record.as_value(), now + self.ttl, subkey=self.subkey)

    async def fetch(self) -> SwarmProgress:
        """The swarm's view from the live records (own record excluded from the sums)."""
        found = await self.dht.get(progress_key(self.run_id), latest=True)
        now_unix, now = time.time(), time.monotonic()
        records: list[PeerProgress] = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                peer_id = _owner(subkey)
                record = PeerProgress.from_value(peer_id, getattr(item, "value", None)) if peer_id else None
                if record is not None:
                    records.append(record)
        if not records:
            return SwarmProgress(0, 0.0, 0.0, 0.0, 0, now)
        epoch = max(r.epoch for r in records)
        samples = reported = speed = 0.0
        for record in records:
            if record.epoch != epoch or record.peer_id == self.peer_id:
                continue
            since = min(max(0.0, now_unix - record.reported_at), MAX_EXTRAPOLATION)
            bound = self._bound(record, now)
            samples += min(record.samples + record.samples_per_second * since, bound)
            reported += min(record.samples, bound)
            speed += min(record.samples_per_second, self.max_samples_per_second)
        return SwarmProgress(epoch, samples, reported, speed, len(records), now)

    def _bound(self, record: PeerProgress, now: float) -> float:
        """The most samples this peer can have made in this epoch: `max_samples_per_second` times
        the time since we first saw it there (plus one second of grace)."""
        if math.isinf(self.max_samples_per_second):
            return math.inf
        seen_at = self._first_seen.setdefault((record.peer_id, record.epoch), now)
        if len(self._first_seen) > 4096:  # forget old epochs
            for key in [k for k in self._first_seen if k[1] < record.epoch - 1]:
                del self._first_seen[key]
        return self.max_samples_per_second * (now - seen_at + 1.0)


def _owner(subkey: Any) -> str | None:
    if isinstance(subkey, str) and subkey.startswith("[owner:") and subkey.endswith("]"):
        return subkey[len("[owner:"):-1]
    return None
