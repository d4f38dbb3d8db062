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
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from apiary.dht.interface import DHTLike
from apiary.dht.validation import owner_marker


GRACE_SECONDS = 5.0  # a peer first seen mid-epoch may have counted this long before we saw it
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
    throughput_slack: float = 4.0  # a peer may be this many times faster than the median peer
    _first_seen: dict[tuple[str, int], float] = field(default_factory=dict)
    _own_epoch: int = 0

    @property
    def subkey(self) -> str:
        return owner_marker(self.peer_id)

    async def publish(self, epoch: int, samples: int, samples_per_second: float) -> bool:
        """Stores this peer's record (signed by the DHT node that stores it)."""
        now = time.time()
        self._own_epoch = epoch
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
        epochs = sorted((r.epoch for r in records), reverse=True)
        # the newest epoch two peers report (ours counts as one), or ours if we are ahead of that
        epoch = max(epochs[1] if len(epochs) > 2 else epochs[0], self._own_epoch)
        current = [r for r in records if r.epoch == epoch]
        median_speed = statistics.median(r.samples_per_second for r in current)
        samples = reported = speed = 0.0
        for record in current:
            if record.peer_id == self.peer_id:
                continue
            since = min(max(0.0, now_unix - record.reported_at), MAX_EXTRAPOLATION)
            bound = self._bound(record, now, median_speed)
            samples += min(record.samples + record.samples_per_second * since, bound)
            reported += min(record.samples, bound)
            speed += min(record.samples_per_second, self.max_samples_per_second)
        return SwarmProgress(epoch, samples, reported, speed, len(records), now)

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


def _owner(subkey: Any) -> str | None:
    if isinstance(subkey, str) and subkey.startswith("[owner:") and subkey.endswith("]"):
        return subkey[len("[owner:"):-1]
    return None
