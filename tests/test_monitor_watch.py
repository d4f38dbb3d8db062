"""Peer records through real DHT nodes, as the monitor watches them: a service's record appears,
its rounds follow each round, it leaves when it stops publishing; records that are not signed by
their owner, or not records at all, are not shown."""

from __future__ import annotations

import asyncio
import time

import pytest

from apiary.averaging.averager import RoundResult
from apiary.dht import DHTNode
from apiary.monitor.view import SwarmWatch
from apiary.services.records import PEERS_KEY, RecordPublisher, RoundLog, fetch_peers, record_subkey
from apiary.wire import PeerAddress

PERIOD = 0.5  # records live three periods


@pytest.fixture
async def nodes():
    first = await DHTNode.launch()
    second = await DHTNode.launch([PeerAddress.parse(first.address)])
    yield first, second
    await second.shutdown()
    await first.shutdown()


async def until(what: str, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)
    return value


async def test_a_service_joins_publishes_its_rounds_and_leaves(nodes):
    reader, node = nodes
    rounds = RoundLog()
    status = {"run_id": "run", "reachability": {"state": "public"}, "address": f"{node.identity.peer_id}@h:1"}
    publisher = RecordPublisher("averager", node.identity.peer_id, lambda: status, node, rounds=rounds, period=PERIOD)
    watch = SwarmWatch(reader, refresh=0.1, timeout=2.0)
    publishing, watching = asyncio.create_task(publisher.run()), asyncio.create_task(watch.run())
    try:
        await until("the record", lambda: _peers(watch))
        (record,) = watch.reading.peers
        assert (record.kind, record.run, record.reachability, record.signer) == (
            "averager", "run", "public", node.identity.peer_id)
        rounds.observe(RoundResult("ok", 2, 1.25, time.time(), sent_bytes=100, received_bytes=50))
        shown = await until("the round", lambda: _rounds(watch))
        assert [(r["result"], r["group_size"], r["seconds"], r["bytes"]) for r in shown] == [("ok", 2, 1.25, 150)]
        publishing.cancel()
        await until("the record's expiry", lambda: _gone(watch), timeout=3 * PERIOD + 5)
        assert [e["event"] for e in watch.events] == ["joined", "left"]
    finally:
        for task in (publishing, watching):
            task.cancel()
        await asyncio.gather(publishing, watching, return_exceptions=True)


async def test_records_not_signed_by_their_owner_or_malformed_are_not_shown(nodes):
    reader, node = nodes
    with pytest.raises(ValueError, match="cannot sign"):  # a node cannot write another peer's record
        await node.store(PEERS_KEY, {"peer_id": "x"}, time.time() + 30,
                         subkey=record_subkey(reader.identity.peer_id, reader.identity.peer_id))
    own = record_subkey(node.identity.peer_id, node.identity.peer_id)
    assert await node.store(PEERS_KEY, {"peer_id": node.identity.peer_id, "kind": "dht"}, time.time() + 30, subkey=own)
    assert await node.store(PEERS_KEY, "not a record", time.time() + 30, subkey=own + "x")
    found = await reader.get(PEERS_KEY, latest=True)
    assert len(found.value) == 2 and await fetch_peers(reader) == []


async def _peers(watch: SwarmWatch) -> bool:
    return watch.reading is not None and len(watch.reading.peers) == 1


async def _rounds(watch: SwarmWatch) -> list:
    runs = watch.api()["rounds"]["runs"] if watch.reading is not None else []
    return runs[0]["rounds"] if runs else []


async def _gone(watch: SwarmWatch) -> bool:
    return watch.reading is not None and not watch.reading.peers
