"""Swarm records: what every service tells the swarm about itself, and how anyone reads them back.

Every service keeps a small peer record under `PEERS_KEY` (`_apiary.peers`): its peer id, kind,
version, addresses, reachability (from its status' `reachability` entry; "unknown" without one),
start time, device, load and a few figures of its status. An averager also keeps a summary of its
recent rounds (group size, seconds, bytes, result) under `rounds_key(run)` (`<run>.rounds`).

A record is published at start and then every `PERIOD` seconds, living three periods, so the
records of a service that stopped disappear on their own; an averager also republishes
`ROUNDS_DELAY` seconds after a round. The subkey is ``owner_marker(signer) + peer_id``: the DHT
node that stores the record signs it (`apiary.dht.validation`): the service's own embedded node,
or the participant's dht service, which speaks for the services that reach the swarm through its
local API.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import apiary
from apiary.dht.api import DHTClient
from apiary.dht.interface import DHTLike
from apiary.dht.validation import owner_marker
from apiary.wire import ChannelPool, Endpoint

logger = logging.getLogger(__name__)

PEERS_KEY = "_apiary.peers"
PERIOD = 15.0  # seconds between publications of a record
RETRY = 1.0  # seconds before trying again while the DHT is not known yet
ROUNDS_KEPT = 16  # rounds in an averager's summary
ROUNDS_DELAY = 5.0  # seconds from a round to the publication of the summary (rounds close together go at once)
MAX_EXPERTS = 256  # expert names listed in an expert server's record
MAX_TEXT = 200  # characters of a string field kept from a record
INFO_FIELDS = ("task", "mode", "loss", "local_epoch", "swarm_epoch", "samples_per_second", "peers", "experts",
               "updates", "routing_table_size", "client_mode", "next_round", "donor_epoch", "forward_seconds",
               "backward_seconds")
ADDRESS_FIELDS = ("address", "initial_peers_for_others", "bulk_address")


def rounds_key(run_id: str) -> str:
    return f"{run_id}.rounds"


def record_subkey(signer: str, peer_id: str) -> str:
    return owner_marker(signer) + peer_id


def _scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int)) or (isinstance(value, str) and len(value) <= MAX_TEXT)


@dataclass(frozen=True)
class PeerRecord:
    """One service's record, as published and as read (`signer`: the DHT identity that signed it)."""

    peer_id: str
    kind: str
    version: str
    addresses: list[str]
    reachability: str
    started_at: float  # unix time
    device: str
    load: float  # the host's 1-minute load average
    run: str | None
    published_at: float  # unix time
    info: dict[str, Any] = field(default_factory=dict)  # a few scalar figures of its status
    experts: list[str] = field(default_factory=list)  # an expert server's experts (at most MAX_EXPERTS)
    signer: str = ""

    def as_value(self) -> dict[str, Any]:
        value = asdict(self)
        del value["signer"]
        return value

    @classmethod
    def from_value(cls, signer: str, peer_id: str, value: Any) -> PeerRecord | None:
        """The record, or None for a malformed one (others' records are untrusted input)."""
        if not isinstance(value, dict) or value.get("peer_id") != peer_id:
            return None
        try:
            record = cls(
                peer_id=peer_id, kind=str(value["kind"])[:MAX_TEXT], version=str(value["version"])[:MAX_TEXT],
                addresses=[str(a)[:MAX_TEXT] for a in value["addresses"]][:16],
                reachability=str(value["reachability"])[:MAX_TEXT], started_at=float(value["started_at"]),
                device=str(value["device"])[:MAX_TEXT], load=float(value["load"]),
                run=None if value["run"] is None else str(value["run"])[:MAX_TEXT],
                published_at=float(value["published_at"]),
                info={str(k): v for k, v in dict(value.get("info") or {}).items() if _scalar(v)},
                experts=[str(n)[:MAX_TEXT] for n in value.get("experts") or []][:MAX_EXPERTS], signer=signer,
            )
        except (KeyError, TypeError, ValueError):
            return None
        if not (math.isfinite(record.started_at) and math.isfinite(record.published_at) and math.isfinite(record.load)):
            return None
        return record


@dataclass(frozen=True)
class RoundSummary:
    """One averaging round of one averager."""

    finished_at: float  # unix time
    result: str  # ok, no_group, failed
    group_size: int
    seconds: float
    bytes: int  # all-reduce tensor bytes sent and received

    @classmethod
    def from_value(cls, value: Any) -> RoundSummary | None:
        try:
            summary = cls(float(value["finished_at"]), str(value["result"])[:32], int(value["group_size"]),
                          float(value["seconds"]), int(value["bytes"]))
        except (KeyError, TypeError, ValueError):
            return None
        return summary if math.isfinite(summary.finished_at) and math.isfinite(summary.seconds) else None


class RoundLog:
    """An averager's recent rounds, fed by its `on_round` callback; `changed` is set by each one."""

    def __init__(self, kept: int = ROUNDS_KEPT):
        self.rounds: deque[RoundSummary] = deque(maxlen=kept)
        self.changed = asyncio.Event()

    def observe(self, result: Any) -> None:
        """Notes an `apiary.averaging.averager.RoundResult`."""
        self.rounds.append(RoundSummary(result.finished_at, result.result, result.group_size, round(result.seconds, 3),
                                        result.sent_bytes + result.received_bytes))
        self.changed.set()


def device_name(device: Any) -> str:
    """`cuda:0` -> the GPU's name (when torch is loaded), anything else -> `cpu (<machine>, n cores)`."""
    text = str(device or "cpu")
    torch = sys.modules.get("torch")
    if text.startswith("cuda") and torch is not None:
        try:
            return f"{text} ({torch.cuda.get_device_name(text)})"
        except Exception:  # noqa: BLE001 - the name is only informative
            return text
    return f"cpu ({platform.machine() or 'unknown'}, {os.cpu_count() or 1} cores)"


def reachability_of(status: Mapping[str, Any]) -> str:
    """The status' `reachability` entry (a verdict, or a mapping holding one), else "unknown"."""
    entry = status.get("reachability")
    if isinstance(entry, Mapping):
        entry = entry.get("verdict", entry.get("state"))
    return str(entry) if entry else "unknown"


def build_record(kind: str, peer_id: str, started_at: float, status: Mapping[str, Any],
                 experts: list[str] | None = None) -> PeerRecord:
    """This service's record from its status (`address` included, as `ServiceHost` gives it)."""
    addresses = [status[f] for f in ADDRESS_FIELDS if isinstance(status.get(f), str) and status[f]]
    addresses += [a for a in status.get("addresses") or [] if isinstance(a, str)]
    run = status.get("run_id")
    return PeerRecord(
        peer_id=peer_id, kind=kind, version=apiary.__version__, addresses=list(dict.fromkeys(addresses)),
        reachability=reachability_of(status), started_at=started_at, device=device_name(status.get("device")),
        load=round(os.getloadavg()[0], 2), run=str(run) if run else None, published_at=time.time(),
        info={f: status[f] for f in INFO_FIELDS if f in status and _scalar(status[f])},
        experts=list(experts or [])[:MAX_EXPERTS],
    )


async def signer_of(dht: DHTLike) -> str:
    """The peer id that signs what `dht` stores: the embedded node's, or the dht service's."""
    identity = getattr(dht, "identity", None)
    if identity is not None:
        return identity.peer_id
    return (await dht.info()).peer_id  # type: ignore[attr-defined]


class RecordPublisher:
    """Keeps one service's records in the DHT: `run()` until cancelled.

    `dht` is the DHT, or a function giving the local API of the participant's dht service once it
    is known (a trainer learns it when its optimizer starts)."""

    def __init__(self, kind: str, peer_id: str, status: Callable[[], Mapping[str, Any]],
                 dht: DHTLike | Callable[[], Endpoint | None], *, experts: Callable[[], list[str]] | None = None,
                 rounds: RoundLog | None = None, period: float = PERIOD):
        self.kind, self.peer_id, self.status = kind, peer_id, status
        self.started_at = time.time()
        self._dht = dht
        self.experts = experts
        self.rounds = rounds
        self.period = period

    async def run(self) -> None:
        pool: ChannelPool | None = None
        dht: DHTLike | None = None if callable(self._dht) else self._dht
        try:
            while True:
                if dht is None:
                    endpoint = self._dht()  # type: ignore[operator]
                    if endpoint is not None:
                        pool = ChannelPool()
                        dht = DHTClient(endpoint, pool, timeout=self.period)
                if dht is not None:
                    await self.publish(dht)
                await self._wait(RETRY if dht is None else self.period)
        finally:
            if pool is not None:
                await pool.close()

    async def _wait(self, seconds: float) -> None:
        if self.rounds is None:
            await asyncio.sleep(seconds)
            return
        try:
            async with asyncio.timeout(seconds):
                await self.rounds.changed.wait()
            await asyncio.sleep(min(ROUNDS_DELAY, seconds))  # the record lives on: at most 2 periods apart
        except asyncio.TimeoutError:
            pass
        self.rounds.changed.clear()

    async def publish(self, dht: DHTLike) -> bool:
        """Stores the records once; never raises (the next period tries again)."""
        try:
            async with asyncio.timeout(self.period):  # not wait_for: on 3.11 it can swallow a cancellation
                signer = await signer_of(dht)
            status = self.status()
            record = build_record(self.kind, self.peer_id, self.started_at, status,
                                  self.experts() if self.experts is not None else None)
            subkey, expiration = record_subkey(signer, self.peer_id), time.time() + 3 * self.period
            items = [(PEERS_KEY, subkey, record.as_value(), expiration)]
            if self.rounds is not None and self.rounds.rounds and record.run:
                items.append((rounds_key(record.run), subkey, [asdict(r) for r in self.rounds.rounds], expiration))
            async with asyncio.timeout(self.period):
                stored = await dht.store_many(items)
        except Exception as e:  # noqa: BLE001 - the DHT may be unreachable for a while
            logger.warning("publishing the %s peer record failed: %s", self.kind, e)
            return False
        return stored[0]


def _owned(subkey: Any) -> tuple[str, str] | None:
    """(signer, peer id) of a record's subkey, or None for one not made by `record_subkey`."""
    if not isinstance(subkey, str) or not subkey.startswith("[owner:"):
        return None
    end = subkey.find("]")
    signer, peer_id = subkey[len("[owner:"):end], subkey[end + 1:]
    return (signer, peer_id) if end > 0 and peer_id else None


async def fetch_peers(dht: DHTLike, *, timeout: float | None = None) -> list[PeerRecord]:
    """The live peer records of the swarm, sorted by kind and peer id."""
    found = await dht.get(PEERS_KEY, latest=True, timeout=timeout)
    records = []
    for subkey, item in (found.value.items() if found is not None and isinstance(found.value, dict) else ()):
        owner = _owned(subkey)
        record = PeerRecord.from_value(*owner, getattr(item, "value", None)) if owner else None
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: (r.kind, r.peer_id))


async def fetch_rounds(dht: DHTLike, runs: list[str], *, timeout: float | None = None
                       ) -> dict[str, dict[str, list[RoundSummary]]]:
    """Each run's recent rounds, by averager peer id."""
    found = await dht.get_many([rounds_key(run) for run in runs], latest=True, timeout=timeout) if runs else []
    result: dict[str, dict[str, list[RoundSummary]]] = {}
    for run, item in zip(runs, found):
        by_peer = result.setdefault(run, {})
        for subkey, entry in (item.value.items() if item is not None and isinstance(item.value, dict) else ()):
            owner = _owned(subkey)
            value = getattr(entry, "value", None)
            if owner and isinstance(value, list):
                by_peer[owner[1]] = [s for s in map(RoundSummary.from_value, value[:ROUNDS_KEPT]) if s is not None]
    return result
