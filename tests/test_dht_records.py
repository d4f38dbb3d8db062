"""Records as users of a DHT node see them: signed, schema-checked, kept across restarts."""

from __future__ import annotations

import time

import pydantic
import pytest
from prometheus_client import CollectorRegistry

from apiary.dht import DHTNode
from apiary.dht.node import NODE_SERVICE, pack
from apiary.dht.protos.dht_pb2 import StoreItem, StoreRequest
from apiary.dht.storage import RedisStorage
from apiary.dht.validation import CompositeValidator, SchemaValidator, SignatureValidator, owner_marker
from apiary.wire import ChannelPool, Identity, PeerAddress, RpcClient


@pytest.fixture
async def pair():
    first = await DHTNode.launch()
    second = await DHTNode.launch([PeerAddress.parse(first.address)])
    yield first, second
    await second.shutdown()
    await first.shutdown()


async def test_an_owner_signed_record_is_readable_by_others_and_a_forgery_is_refused(pair) -> None:
    first, second = pair
    key = f"progress{owner_marker(first.identity.peer_id)}"
    expiration = time.time() + 60
    assert await first.store(key, {"epoch": 3}, expiration)
    found = await second.get(key)
    assert found is not None and found.value == {"epoch": 3}

    # a third party writes the owner's key with a newer expiration but no valid signature
    forged = StoreItem(key=pack(key), value=pack({"epoch": 999}), expiration=expiration + 30)
    async with ChannelPool() as pool:
        response = await RpcClient(pool, NODE_SERVICE, second.server.local_endpoint).call(
            "Store", StoreRequest(items=[forged])
        )
    assert list(response.stored) == [False]
    assert (await second.get(key)).value == {"epoch": 3}
    assert (await first.get(key, latest=True)).value == {"epoch": 3}


async def test_a_node_refuses_to_sign_for_another_owner(pair) -> None:
    first, second = pair
    key = f"progress{owner_marker(second.identity.peer_id)}"
    with pytest.raises(ValueError, match=second.identity.peer_id):
        await first.store(key, 1, time.time() + 60)


async def test_rejections_are_counted_in_metrics() -> None:
    registry = CollectorRegistry()
    node = await DHTNode.launch(registry=registry)
    owner = Identity.generate()
    item = StoreItem(key=pack(f"k{owner_marker(owner.peer_id)}"), value=pack(1), expiration=time.time() + 60)
    try:
        async with ChannelPool() as pool:
            await RpcClient(pool, NODE_SERVICE, node.server.local_endpoint).call("Store", StoreRequest(items=[item]))
        assert registry.get_sample_value("apiary_dht_rejected_records_total", {"reason": "validation"}) == 1
    finally:
        await node.shutdown()


class Schedule(pydantic.BaseModel):
    epoch: int
    peers: dict[str, float]


async def test_schema_violations_are_refused_and_good_records_pass() -> None:
    def validator(identity: Identity) -> CompositeValidator:
        return CompositeValidator([SignatureValidator(identity), SchemaValidator(Schedule, prefix="run.")])

    a, b = Identity.generate(), Identity.generate()
    first = await DHTNode.launch(identity=a, validator=validator(a))
    second = await DHTNode.launch([PeerAddress.parse(first.address)], identity=b, validator=validator(b))
    try:
        expiration = time.time() + 60
        assert await first.store("run.epoch", 7, expiration)
        assert (await second.get("run.epoch")).value == 7
        assert await first.store("run.peers", 12.5, expiration, subkey="peer-a")
        assert not any(await first.store_many([("run.epoch", None, "seven", expiration + 1)]))
        assert not await first.store("run.unknown", 1, expiration)
        assert (await second.get("run.epoch", latest=True)).value == 7
        assert await first.store("elsewhere", "anything", expiration)
    finally:
        await second.shutdown()
        await first.shutdown()


async def test_an_oversized_value_is_refused_before_sending() -> None:
    node = await DHTNode.launch()
    try:
        with pytest.raises(ValueError, match="max_value_bytes"):
            await node.store("big", b"x" * (node.settings.max_value_bytes + 1), time.time() + 60)
    finally:
        await node.shutdown()


async def test_a_node_with_redis_storage_restarts_and_still_serves_its_records(redis_url: str) -> None:
    identity = Identity.generate()
    expiration = time.time() + 120
    node = await DHTNode.launch(identity=identity, storage=await RedisStorage.open(redis_url))
    assert await node.store("weights", {"version": 5}, expiration)
    assert await node.store("members", "here", expiration + 1, subkey="peer-a")
    await node.shutdown()

    restarted = await DHTNode.launch(identity=identity, storage=await RedisStorage.open(redis_url))
    reader = await DHTNode.launch([PeerAddress.parse(restarted.address)])
    try:
        found = await reader.get("weights")
        assert found is not None and found.value == {"version": 5}
        assert found.expiration == pytest.approx(expiration, abs=1e-6)
        members = await reader.get("members", latest=True)
        assert members.value["peer-a"].value == "here"
        assert members.value["peer-a"].expiration == pytest.approx(expiration + 1, abs=1e-6)
    finally:
        await reader.shutdown()
        await restarted.shutdown()
