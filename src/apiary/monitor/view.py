"""The swarm as the monitor and `apiary status` show it, read from the DHT.

`read_swarm()` reads once: the peer records (`apiary.services.records`), each run's progress
records (all of them, from every shard of a large swarm: `apiary.formats.progress.read_whole`)
and the rounds its averagers published, and the experts the expert servers name, checked
against their live declarations (`apiary.formats.declarations`). `SwarmWatch` reads every `refresh` seconds and keeps what one
reading cannot show: each run's throughput and loss over time, each peer's contribution over the
epochs, and the peers that joined or left. Both give the JSON of the monitor's `/api/...`.

A trainer publishes a throughput of 0 while it averages (its samples do not grow then); the
watch shows such a peer at the throughput it last trained at, as one reading shows it at 0.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from apiary.dht.interface import DHTLike
from apiary.formats.declarations import find_experts, grid_coordinates
from apiary.formats.progress import PeerProgress, read_whole, swarm_epoch
from apiary.services.records import PeerRecord, RoundSummary, fetch_peers, fetch_rounds

logger = logging.getLogger(__name__)

LATENCY_FIELDS = ("forward_seconds", "backward_seconds")  # an expert server's recent latency, per request
HISTORY = 720  # points of each run's series kept (an hour at the default refresh)
EVENTS = 100  # joins and leaves kept


@dataclass
class Reading:
    """One reading of the swarm."""

    taken_at: float  # unix time
    peers: list[PeerRecord]
    progress: dict[str, list[PeerProgress]]  # by run
    epochs: dict[str, int]  # each run's swarm epoch
    rounds: dict[str, dict[str, list[RoundSummary]]]  # by run, then averager peer id
    experts: dict[str, str | None]  # expert name -> the address declaring it (None: not declared now)


async def read_swarm(dht: DHTLike, *, timeout: float = 10.0) -> Reading:
    """Reads the swarm once (each DHT lookup ends after `timeout` seconds with what it found)."""
    peers = await fetch_peers(dht, timeout=timeout)
    runs = sorted({p.run for p in peers if p.run})
    found = await asyncio.gather(*(read_whole(dht, run, timeout=timeout) for run in runs))
    progress = dict(zip(runs, found))
    epochs = {run: swarm_epoch(records) for run, records in progress.items()}
    rounds = await fetch_rounds(dht, runs, timeout=timeout)
    names = sorted({name for p in peers if p.kind == "expert-server" for name in p.experts})
    experts = await find_experts(dht, names, timeout=timeout)
    return Reading(time.time(), peers, progress, epochs, rounds, experts)


@dataclass
class RunHistory:
    """What the watch remembers of a run."""

    series: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    best: dict[tuple[str, int], int] = field(default_factory=dict)  # (peer, epoch) -> most samples reported
    speeds: dict[str, float] = field(default_factory=dict)  # peer -> the last throughput it trained at


class SwarmWatch:
    """Reads the swarm every `refresh` seconds (`run()`, until cancelled); `api()` is the JSON."""

    def __init__(self, dht: DHTLike, *, refresh: float = 5.0, timeout: float = 10.0):
        self.dht = dht
        self.refresh = refresh
        self.timeout = timeout
        self.reading: Reading | None = None
        self.error: str | None = None
        self.history: dict[str, RunHistory] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(self.refresh)

    async def update(self) -> None:
        """One reading, folded into the history; a failed one is reported by `api()`, never raised."""
        try:
            reading = await read_swarm(self.dht, timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - the DHT may be unreachable for a while
            logger.warning("reading the swarm failed: %s", e)
            self.error = str(e) or type(e).__name__
            return
        self._fold(reading)
        self.reading, self.error = reading, None
        self.ready.set()

    def _fold(self, reading: Reading) -> None:
        before = {p.peer_id: p for p in self.reading.peers} if self.reading is not None else {}
        now = {p.peer_id: p for p in reading.peers}
        for peer_id in sorted(now.keys() - before.keys()):
            self.events.append(_event(reading.taken_at, now[peer_id], "joined"))
        for peer_id in sorted(before.keys() - now.keys()):
            self.events.append(_event(reading.taken_at, before[peer_id], "left"))
        for run, records in reading.progress.items():
            history = self.history.setdefault(run, RunHistory())
            for record in records:
                key = (record.peer_id, record.epoch)
                history.best[key] = max(history.best.get(key, 0), record.samples)
                if record.samples_per_second > 0:
                    history.speeds[record.peer_id] = record.samples_per_second
            summary = run_summary(reading, run, history.speeds)
            history.series.append({"time": reading.taken_at, "epoch": summary["epoch"],
                                   "samples_per_second": summary["samples_per_second"], "loss": summary["loss"]})

    def api(self) -> dict[str, Any]:
        """Everything the page shows: `peers`, `runs`, `experts`, `rounds` (see `swarm_json`)."""
        if self.reading is None:
            return {"time": time.time(), "ready": False, "error": self.error}
        return swarm_json(self.reading, self)


def _event(at: float, record: PeerRecord, what: str) -> dict[str, Any]:
    return {"time": at, "peer_id": record.peer_id, "kind": record.kind, "run": record.run, "event": what}


def speed(record: PeerProgress, speeds: dict[str, float] | None) -> float:
    """A peer's throughput: as published, or while it averages, the last it trained at (`speeds`)."""
    return record.samples_per_second or (speeds or {}).get(record.peer_id, 0.0)


def run_summary(reading: Reading, run: str, speeds: dict[str, float] | None = None) -> dict[str, Any]:
    """A run's epoch, throughput at that epoch, mean loss of its trainers and peer count."""
    records = reading.progress.get(run, [])
    epoch = reading.epochs.get(run, 0)
    losses = [p.info["loss"] for p in reading.peers
              if p.run == run and p.kind == "trainer" and isinstance(p.info.get("loss"), (int, float))]
    return {"run": run, "epoch": epoch, "peers": len(records),
            "samples_per_second": round(sum(speed(r, speeds) for r in records if r.epoch == epoch), 2),
            "samples": sum(r.samples for r in records if r.epoch == epoch),
            "loss": round(statistics.fmean(losses), 4) if losses else None}


def peers_json(reading: Reading) -> dict[str, Any]:
    by_kind: dict[str, int] = {}
    for record in reading.peers:
        by_kind[record.kind] = by_kind.get(record.kind, 0) + 1
    return {"count": len(reading.peers), "by_kind": dict(sorted(by_kind.items())), "peers": [
        {**record.as_value(), "signer": record.signer,
         "uptime_seconds": round(max(0.0, reading.taken_at - record.started_at), 1),
         "age_seconds": round(max(0.0, reading.taken_at - record.published_at), 1)}
        for record in reading.peers]}


def runs_json(reading: Reading, watch: SwarmWatch | None = None) -> dict[str, Any]:
    runs = []
    for run in sorted(reading.progress):
        history = watch.history.get(run) if watch is not None else None
        speeds = history.speeds if history is not None else None
        contributed: dict[str, int] = {}
        for (peer_id, _), samples in (history.best.items() if history is not None else ()):
            contributed[peer_id] = contributed.get(peer_id, 0) + samples
        leaderboard = sorted(
            ({"peer_id": r.peer_id, "epoch": r.epoch, "samples": r.samples, "samples_per_second": speed(r, speeds),
              "client": r.client, "contributed": contributed.get(r.peer_id, r.samples)}
             for r in reading.progress[run]),
            key=lambda entry: (-entry["contributed"], entry["peer_id"]))
        runs.append({**run_summary(reading, run, speeds), "leaderboard": leaderboard,
                     "history": list(history.series) if history is not None else [],
                     "events": [e for e in (watch.events if watch is not None else ()) if e["run"] == run]})
    return {"runs": runs}


def experts_json(reading: Reading) -> dict[str, Any]:
    servers = {p.peer_id: p for p in reading.peers if p.kind == "expert-server"}
    grids: dict[str, list[dict[str, Any]]] = {}
    for name, address in sorted(reading.experts.items()):
        try:
            prefix, coordinates = grid_coordinates(name)
        except ValueError:
            continue
        peer_id = address.split("@", 1)[0] if address else None
        server = servers.get(peer_id) if peer_id else None
        grids.setdefault(prefix, []).append({
            "name": name, "coordinates": coordinates, "declared": address is not None, "address": address,
            "server": peer_id, "load": server.load if server is not None else None,
            **{field: server.info.get(field) if server is not None else None for field in LATENCY_FIELDS}})
    return {"grids": [{"prefix": prefix, "experts": experts, "servers": len({e["server"] for e in experts if e["server"]}),
                       "declared": sum(e["declared"] for e in experts)} for prefix, experts in sorted(grids.items())]}


def rounds_json(reading: Reading) -> dict[str, Any]:
    runs = []
    for run, by_peer in sorted(reading.rounds.items()):
        rounds = sorted(({"peer_id": peer_id, **asdict(summary)} for peer_id, summaries in by_peer.items()
                         for summary in summaries), key=lambda r: -r["finished_at"])
        results: dict[str, int] = {}
        for entry in rounds:
            results[entry["result"]] = results.get(entry["result"], 0) + 1
        runs.append({"run": run, "averagers": len(by_peer), "results": results, "rounds": rounds})
    return {"runs": runs}


def swarm_json(reading: Reading, watch: SwarmWatch | None = None) -> dict[str, Any]:
    """The whole reading as JSON: {"time", "ready", "peers", "runs", "experts", "rounds"}."""
    return {"time": reading.taken_at, "ready": True, "error": watch.error if watch is not None else None,
            "peers": peers_json(reading), "runs": runs_json(reading, watch), "experts": experts_json(reading),
            "rounds": rounds_json(reading), "events": list(watch.events) if watch is not None else []}
