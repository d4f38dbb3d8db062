"""The DHT as a swarm of real processes: lookups, store/get semantics, failures, bad input.

The swarm's nodes run in worker processes (`tests/dht_swarm.py`); the test process talks to
them through their local APIs (`DHTClient`), through the DHT protocol itself (`RpcClient` with
`NODE_SERVICE`), or by joining with its own `DHTNode` as one more participant.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from dht_swarm import Swarm, SwarmNode

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.ids import ID_BITS, ID_BYTES, distance, id_of, id_to_bytes, node_id
from apiary.dht.node import NODE_SERVICE, pack
from apiary.dht.protos.dht_pb2 import FindRequest, NodeInfo, StoreItem, StoreRequest
from apiary.wire import ChannelPool, Identity, RequestRejected, RpcClient

DEFAULTS = DHTSettings()  # what the swarm's nodes run with
REPLICAS = DEFAULTS.num_replicas


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    """32 nodes in 8 processes, shared by the tests that leave it intact."""
    with Swarm(workers=8, nodes_per_worker=4, seed=1) as swarm:
        yield swarm


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool() as pool:
        yield pool


def key_id(key: object) -> int:
    return id_of(pack(key))


def brute_force_nearest(target: int, peer_ids: list[str], count: int) -> list[str]:
    return sorted(peer_ids, key=lambda peer: distance(node_id(peer), target))[:count]


def unique_key(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


# ---- lookups ----


async def test_a_newcomers_nearest_nodes_match_brute_force(swarm: Swarm) -> None:
    entry = random.Random(2).choice(swarm.nodes)
    newcomer = await DHTNode.launch([entry.peer_address])
    try:
        everyone = [node.peer_id for node in swarm.nodes] + [newcomer.identity.peer_id]
        rng = random.Random(3)
        targets = [rng.getrandbits(ID_BITS) for _ in range(100)]
        answers = await asyncio.gather(*(newcomer.find_nearest([t], 5) for t in targets))
        mismatches = []
        for target, answer in zip(targets, answers):
            found = {contact.peer_id for contact in answer[target]}
            expected = set(brute_force_nearest(target, everyone, 5))
            if found != expected:
                mismatches.append((hex(target)[:12], len(found & expected)))
        assert len(mismatches) <= 5, f"{len(mismatches)}/100 keys with wrong nearest nodes: {mismatches}"
    finally:
        await newcomer.shutdown()


# ---- store and get through different nodes ----


async def test_a_value_stored_through_one_node_is_read_through_others(swarm: Swarm, pool: ChannelPool) -> None:
    key, value = unique_key("plain"), {"host": "10.0.0.1", "layers": [1, 2, 3]}
    writer, *readers = [swarm.nodes[i] for i in (0, 5, 10, 17, 22, 31)]
    assert await swarm.client(writer, pool).store(key, value, time.time() + 60)
    for reader in readers:
        found = await swarm.client(reader, pool).get(key)
        assert found is not None, f"node {reader.index} does not find {key}"
        assert found.value == value
    assert await swarm.client(readers[0], pool).get(unique_key("never-stored")) is None


async def test_subkeys_written_through_different_nodes_merge(swarm: Swarm, pool: ChannelPool) -> None:
    key, expiration = unique_key("dict"), time.time() + 60
    assert await swarm.client(1, pool).store(key, "alice's value", expiration, subkey="alice")
    assert await swarm.client(14, pool).store(key, "bob's value", expiration + 1, subkey="bob")
    for reader in (7, 26):
        found = await swarm.client(reader, pool).get(key, latest=True)
        assert found is not None
        assert {subkey: item.value for subkey, item in found.value.items()} == {
            "alice": "alice's value", "bob": "bob's value",
        }
        assert found.value["bob"].expiration == pytest.approx(expiration + 1)


async def test_a_newer_expiration_wins_and_an_older_write_is_refused(swarm: Swarm, pool: ChannelPool) -> None:
    key, now = unique_key("versions"), time.time()
    assert await swarm.client(2, pool).store(key, "first", now + 30)
    assert await swarm.client(19, pool).store(key, "second", now + 60)
    found = await swarm.client(29, pool).get(key, latest=True)
    assert found is not None and found.value == "second"
    assert found.expiration == pytest.approx(now + 60)

    assert not await swarm.client(11, pool).store(key, "stale", now + 45), "an older write was accepted"
    for reader in (4, 24):
        found = await swarm.client(reader, pool).get(key, latest=True)
        assert found is not None and found.value == "second"


async def test_an_expired_value_disappears(swarm: Swarm, pool: ChannelPool) -> None:
    key = unique_key("short-lived")
    assert await swarm.client(3, pool).store(key, "soon gone", time.time() + 1.5)
    reader = swarm.client(20, pool)
    found = await reader.get(key)
    assert found is not None and found.value == "soon gone"
    deadline = time.monotonic() + 10
    while (found := await reader.get(key)) is not None:
        assert time.monotonic() < deadline, f"still readable 10 s after it expired: {found}"
        await asyncio.sleep(0.25)
    assert await swarm.client(30, pool).get(key, latest=True) is None


# ---- client mode ----


async def test_a_client_mode_node_stores_and_gets_but_is_in_no_routing_table(swarm: Swarm, pool: ChannelPool) -> None:
    entry = swarm.nodes[9]
    client = await DHTNode.launch([entry.peer_address], settings=DHTSettings(client_mode=True))
    try:
        assert client.address == "" and client.server is None
        keys = [unique_key("from-client") for _ in range(5)]
        stored = await client.store_many([(key, None, f"value {i}", time.time() + 60) for i, key in enumerate(keys)])
        assert stored == [True] * len(keys)
        assert await client.store(keys[0], "as a subkey", time.time() + 90, subkey="s")
        found = await client.get_many(keys[1:])
        assert [f.value if f else None for f in found] == [f"value {i}" for i in range(1, len(keys))]
        found = await swarm.client(27, pool).get(keys[1])
        assert found is not None and found.value == "value 1"
        await client.find_nearest([random.getrandbits(ID_BITS) for _ in range(10)])

        # Ask every swarm node for its nearest nodes to the client's own id: had any of them put
        # the client in its routing table, the client would top that list (distance 0). The
        # question comes from another client-mode sender (a node leaves the sender out of its
        # answer, and a sender without an address is added to no table).
        target = id_to_bytes(node_id(client.identity.peer_id))
        me = NodeInfo(peer_id=Identity.generate().peer_id)
        for node in swarm.alive_nodes():
            response = await RpcClient(pool, NODE_SERVICE, node.endpoint, timeout=5).call(
                "Find", FindRequest(sender=me, key_ids=[target])
            )
            listed = {info.peer_id for info in response.results[0].nearest}
            assert client.identity.peer_id not in listed, f"node {node.index} lists the client-mode node"
            assert listed, f"node {node.index} knows no one"
    finally:
        await client.shutdown()


# ---- malformed and oversized input ----


def _store(items: list[StoreItem]) -> tuple[str, StoreRequest]:
    return "Store", StoreRequest(sender=NodeInfo(peer_id="x"), items=items)


def _find(key_ids: list[bytes]) -> tuple[str, FindRequest]:
    return "Find", FindRequest(sender=NodeInfo(peer_id="x"), key_ids=key_ids)


def _item(value: bytes = b"\xa1v", expiration: float | None = None, key: bytes = b"\xa1k") -> StoreItem:
    return StoreItem(key=key, value=value, expiration=time.time() + 60 if expiration is None else expiration)


TOO_MANY = DEFAULTS.max_items_per_request + 1
BAD_REQUESTS = {  # case: (the request, what the refusal names, the error the caller gets)
    "key id of the wrong length": (lambda: _find([id_to_bytes(1), b"\x01" * (ID_BYTES - 1)]), "key_ids", RequestRejected),
    "too many items": (lambda: _store([_item() for _ in range(TOO_MANY)]), "max_items_per_request", RequestRejected),
    "too many key ids": (lambda: _find([id_to_bytes(i) for i in range(TOO_MANY)]), "max_items_per_request",
                         RequestRejected),
    "expiration not finite": (lambda: _store([_item(expiration=float("nan"))]), "expiration", RequestRejected),
    "empty key": (lambda: _store([_item(key=b"")]), "empty key", RequestRejected),
}


async def _still_serves(swarm: Swarm, node: SwarmNode, pool: ChannelPool, key: str) -> None:
    found = await swarm.client(node, pool).get(key)
    assert found is not None and found.value == "still here", "the node stopped serving after bad input"
    response = await RpcClient(pool, NODE_SERVICE, node.endpoint, timeout=5).call(
        "Find", FindRequest(sender=NodeInfo(peer_id="x"), key_ids=[id_to_bytes(key_id(key))])
    )
    assert response.node.peer_id == node.peer_id


@pytest.fixture
async def target(swarm: Swarm, pool: ChannelPool) -> tuple[SwarmNode, str]:
    node, key = swarm.nodes[12], unique_key("probe")
    assert await swarm.client(node, pool).store(key, "still here", time.time() + 300)
    return node, key


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_a_bad_request_is_rejected_naming_the_limit_and_the_node_keeps_serving(
    swarm: Swarm, pool: ChannelPool, target: tuple[SwarmNode, str], case: str
) -> None:
    node, key = target
    make, named, error = BAD_REQUESTS[case]
    method, request = make()
    with pytest.raises(error) as caught:
        await RpcClient(pool, NODE_SERVICE, node.endpoint, timeout=10).call(method, request)
    assert named in str(caught.value), str(caught.value)
    await _still_serves(swarm, node, pool, key)


async def test_a_record_past_a_limit_is_refused_naming_the_limit_and_the_others_are_stored(
    swarm: Swarm, pool: ChannelPool, target: tuple[SwarmNode, str]
) -> None:
    node, key = target
    method, request = _store([_item(b"x" * (DEFAULTS.max_value_bytes + 1)), _item(key=pack(unique_key("fits")))])
    response = await RpcClient(pool, NODE_SERVICE, node.endpoint, timeout=10).call(method, request)
    assert list(response.stored) == [False, True]
    assert list(response.refused) == [f"max_value_bytes={DEFAULTS.max_value_bytes}", ""]
    await _still_serves(swarm, node, pool, key)


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x12\xff\xff\xff\xff\x0f", b"\x0a\x05abc"])
async def test_garbage_bytes_get_invalid_argument_and_the_node_keeps_serving(
    swarm: Swarm, pool: ChannelPool, target: tuple[SwarmNode, str], garbage: bytes
) -> None:
    node, key = target
    channel = pool.channel(node.endpoint, node.peer_id)  # TLS, as every peer dials it
    call = channel.unary_unary("/apiary.dht.Node/Store", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(garbage, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "StoreRequest" in (caught.value.details() or "")
    await _still_serves(swarm, node, pool, key)


# ---- failures ----


def _nearest_workers(swarm: Swarm, key: object) -> set[int]:
    nearest = brute_force_nearest(key_id(key), [n.peer_id for n in swarm.nodes], REPLICAS)
    return {node.worker for node in swarm.nodes if node.peer_id in nearest}


async def test_every_value_survives_when_a_fifth_of_the_nodes_die(pool: ChannelPool) -> None:
    with Swarm(workers=10, nodes_per_worker=3, seed=4) as swarm:
        rng = random.Random(5)
        values = {unique_key("durable"): rng.getrandbits(64) for _ in range(50)}
        expiration = time.time() + 300
        stored = await asyncio.gather(*(
            swarm.client(rng.choice(swarm.nodes), pool).store(key, value, expiration) for key, value in values.items()
        ))
        assert all(stored), f"{stored.count(False)} of {len(stored)} stores failed before any node died"

        # Two whole workers (6 of 30 nodes) die. Pick two that do not hold all REPLICAS copies of
        # some key: a value that lost every replica is gone in any DHT with this replication.
        choices = [
            pair for pair in itertools.combinations(range(10), 2)
            if not any(_nearest_workers(swarm, key) <= set(pair) for key in values)
        ]
        assert choices, "no two workers can die without taking every replica of some key"
        dead = rng.choice(choices)
        for worker in dead:
            swarm.kill_worker(worker)
        survivors = swarm.alive_nodes()
        assert len(survivors) == 24

        async def read(key: str) -> object:
            found = await swarm.client(rng.choice(survivors), pool, timeout=20).get(key)
            return None if found is None else found.value

        started = time.monotonic()
        found = await asyncio.wait_for(asyncio.gather(*(read(key) for key in values)), timeout=40)
        lost = [key for key, value in zip(values, found) if value != values[key]]
        assert not lost, f"{len(lost)} of {len(values)} values lost after killing workers {dead}"
        assert time.monotonic() - started < 30

        codes = swarm.close()  # the survivors shut down cleanly on SIGTERM, dead peers or not
        assert {codes[w] for w in range(10) if w not in dead} == {0}, [swarm.stderr_of(w) for w in range(10)]


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_a_dead_peer_is_skipped_quickly_on_later_gets(pool: ChannelPool, how: str) -> None:
    """Killed: connections are refused. Frozen (SIGSTOP): calls hang until their deadline, so the
    first get may wait one rpc_timeout (3 s); later ones must skip the blacklisted peer."""
    with Swarm(workers=10, nodes_per_worker=1, seed=6) as swarm:
        everyone = [n.peer_id for n in swarm.nodes]
        # The victim is the node nearest to the most of 2000 random keys, and the reader the node
        # that is no replica of the most of those keys: four of them are used, so every lookup
        # for them heads to the victim first, and the reader holds none of them itself.
        by_nearest: dict[str, list[str]] = {}
        for key in (unique_key("blacklist") for _ in range(2000)):
            by_nearest.setdefault(brute_force_nearest(key_id(key), everyone, 1)[0], []).append(key)
        victim_id, candidates = max(by_nearest.items(), key=lambda item: len(item[1]))
        victim = next(n for n in swarm.nodes if n.peer_id == victim_id)
        replicas = {key: brute_force_nearest(key_id(key), everyone, REPLICAS) for key in candidates}
        reader, keys = max(
            ((node, [key for key in candidates if node.peer_id not in replicas[key]]) for node in swarm.nodes),
            key=lambda item: len(item[1]),
        )
        keys = keys[:4]
        assert len(keys) == 4
        rng = random.Random(7)
        for key in keys:
            assert await swarm.client(rng.choice(swarm.nodes), pool).store(key, key.upper(), time.time() + 300)

        (swarm.kill_worker if how == "killed" else swarm.freeze_worker)(victim.worker)
        client = swarm.client(reader, pool, timeout=30)

        # Plain gets stop at the first value; gets with latest=True ask every node near the key,
        # including the dead one that other nodes still list: only the blacklist skips it then.
        timings = []
        for attempt in range(4):
            for key in keys:
                started = time.monotonic()
                found = await client.get(key, latest=attempt % 2 == 1)
                timings.append(time.monotonic() - started)
                assert found is not None and found.value == key.upper(), f"attempt {attempt}: {key} not found"
        first, later = timings[0], timings[1:]
        assert first < 5.0, f"first get took {first:.1f}s"
        assert max(later) < 1.5, f"later gets waited for the dead peer again: {[round(t, 2) for t in timings]}"


# ---- batches larger than one request may carry ----


async def test_batches_over_max_items_per_request_reach_every_replica(pool: ChannelPool) -> None:
    """1500 keys on 6 nodes: a node is a replica of ~1250 of them, more than one Store or Find
    request may carry (max_items_per_request=1024). Every replica must still get its items, and
    no healthy node may be dropped from the writer's routing table for it."""
    count, limit = 1500, DEFAULTS.max_items_per_request
    with Swarm(workers=3, nodes_per_worker=2, seed=8) as swarm:
        writer = swarm.client(0, pool, timeout=60)
        neighbours = (await writer.info()).routing_table_size
        assert neighbours == 5
        keys = [f"bulk-{i}" for i in range(count)]
        stored = await writer.store_many([(key, None, i, time.time() + 300) for i, key in enumerate(keys)])
        assert stored == [True] * count
        assert (await writer.info()).routing_table_size == neighbours, "healthy neighbours were dropped"

        everyone = [node.peer_id for node in swarm.nodes]
        me = NodeInfo(peer_id=Identity.generate().peer_id)
        replicas = {node.peer_id: [] for node in swarm.nodes}
        for key in keys:
            for peer_id in brute_force_nearest(key_id(key), everyone, REPLICAS):
                replicas[peer_id].append(key)
        assert max(map(len, replicas.values())) > limit  # 5 of 6 nodes hold each key: 1250 on average
        for node in swarm.nodes:
            should_hold = replicas[node.peer_id]
            ids = [id_to_bytes(key_id(key)) for key in should_hold]
            held = 0
            for start in range(0, len(ids), limit):
                response = await RpcClient(pool, NODE_SERVICE, node.endpoint, timeout=10).call(
                    "Find", FindRequest(sender=me, key_ids=ids[start:start + limit])
                )
                held += sum(result.value.found for result in response.results)
            assert held == len(should_hold), f"node {node.index} holds {held} of its {len(should_hold)} replicas"

        reader = await DHTNode.launch([swarm.nodes[3].peer_address], settings=DHTSettings(client_mode=True))
        try:
            missing = [f"never-stored-{i}" for i in range(count)]  # asked of every node: >1024 ids each
            found = await reader.get_many(keys + missing)
            assert [f.value if f else None for f in found] == list(range(count)) + [None] * count
            assert len(reader.routing) == len(swarm.nodes), "healthy nodes were dropped from the reader's table"
        finally:
            await reader.shutdown()
