"""Experts declared in the DHT are found by name and by grid prefix, and vanish when not re-declared."""

from __future__ import annotations

import asyncio
import time

import pytest

from apiary.dht import DHTNode
from apiary.moe.declaration import declare_experts, find_experts, grid_coordinates, keep_declared, next_coordinates
from apiary.wire import PeerAddress


@pytest.fixture
async def two_nodes():
    first = await DHTNode.launch()
    second = await DHTNode.launch([PeerAddress.parse(first.address)])
    yield first, second
    await second.shutdown()
    await first.shutdown()


async def test_declared_experts_are_found_by_name_and_by_prefix(two_nodes) -> None:
    server_dht, trainer_dht = two_nodes
    assert all(await declare_experts(server_dht, ["ffn.0.1", "ffn.0.2", "ffn.1.0"], "host-a:31337", ttl=30))
    await declare_experts(server_dht, ["ffn.3.3"], "host-b:31337", ttl=30)

    found = await find_experts(trainer_dht, ["ffn.0.1", "ffn.3.3", "ffn.9.9"])
    assert found == {"ffn.0.1": "host-a:31337", "ffn.3.3": "host-b:31337", "ffn.9.9": None}
    assert set(await next_coordinates(trainer_dht, "ffn.")) == {0, 1, 3}
    assert await next_coordinates(trainer_dht, "ffn.0.") == {1: ("ffn.0.1", "host-a:31337"), 2: ("ffn.0.2", "host-a:31337")}
    assert await next_coordinates(trainer_dht, "attention.") == {}


async def test_experts_of_a_server_that_stops_declaring_disappear(two_nodes) -> None:
    server_dht, trainer_dht = two_nodes
    task = asyncio.create_task(keep_declared(server_dht, ["ffn.0.0"], "host-a:1", period=0.5))
    await asyncio.sleep(0.3)
    assert (await find_experts(trainer_dht, ["ffn.0.0"]))["ffn.0.0"] == "host-a:1"
    await asyncio.sleep(1.0)  # still re-declared while the server lives
    assert (await find_experts(trainer_dht, ["ffn.0.0"]))["ffn.0.0"] == "host-a:1"
    task.cancel()  # the server dies
    deadline = time.monotonic() + 5
    while (await find_experts(trainer_dht, ["ffn.0.0"]))["ffn.0.0"] is not None:
        assert time.monotonic() < deadline, "a dead server's expert is still declared"
        await asyncio.sleep(0.2)
    assert await next_coordinates(trainer_dht, "ffn.0.") == {}


def test_names_off_the_grid_are_refused_clearly() -> None:
    assert grid_coordinates("ffn.0.3") == ("ffn", [0, 3])
    for bad in ("ffn", "ffn.a.1", ".0.1", "ffn..1"):
        with pytest.raises(ValueError, match="not on a grid"):
            grid_coordinates(bad)
