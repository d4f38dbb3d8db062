"""Services and their reachability: announced addresses that change while they run, what peers
observe, the verdict on /status, /readyz and the metrics, and relayed services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from apiary.averaging.api.client import AveragerClient
from apiary.averaging.averager import AveragerSettings
from apiary.averaging.state import donors_key
from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.moe.declaration import find_experts
from apiary.services.averager import AveragerService, AveragerServiceSettings
from apiary.services.dht import DHTService, DHTServiceSettings
from apiary.services.expert_server import ExpertServerService, ExpertServerSettings
from apiary.services.host import ServiceSettings
from apiary.wire import PROBE, ChannelPool, Endpoint, PeerAddress, RpcClient, RpcServer, WireSettings
from apiary.wire.protos.wire_pb2 import PingRequest

LOCAL = WireSettings(listen_host="127.0.0.1")


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """The first truthy result of `check`, polled until `timeout` seconds pass (then fails)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            assert result, f"not true after {timeout} s"
            return result
        await asyncio.sleep(0.1)


def renamed(server: RpcServer) -> tuple[Endpoint, Endpoint | None]:
    """The server's endpoints under another name of this host (`localhost`): still dialable."""
    bulk = server.announced_bulk
    return Endpoint("localhost", server.port), None if bulk is None else Endpoint("localhost", bulk.port)


async def test_a_switched_announced_address_reaches_every_record() -> None:
    dht = DHTService(LOCAL, ServiceSettings(), DHTSettings(), DHTServiceSettings())
    await dht.start()
    experts = ExpertServerService(LOCAL, ServiceSettings(), ExpertServerSettings(
        experts=["ffn.0.0"], hidden_size=4, device="cpu", declare_period=0.3, dht_local=dht.local_endpoint))
    averager = AveragerService(LOCAL, ServiceSettings(),
                               AveragerSettings(prefix="run", gather_seconds=0.2, join_seconds=0.2),
                               AveragerServiceSettings(dht_local=dht.local_endpoint, announce_period=0.3))
    other: DHTNode | None = None
    client = DHTClient(dht.local_endpoint)
    trainer: AveragerClient | None = None
    try:
        await experts.start()
        await averager.start()
        trainer = AveragerClient(averager.local_endpoint)
        await trainer.publish_state({"epoch": 1}, [torch.ones(3)])
        node = averager.averager
        node.register([torch.zeros(3)])
        assert await node.step() is None  # round 0, alone: announced at the first address
        hosts = [dht.host, experts.host, averager.host]
        for host in hosts:
            host.server.announce(*renamed(host.server))

        async with ChannelPool(LOCAL) as pool:  # Ping names the new address, as /status does
            for host in hosts:
                reply = await RpcClient(pool, PROBE, host.server.local_endpoint).call("Ping", PingRequest())
                assert reply.announced_address == f"{host.identity.peer_id}@localhost:{host.server.port}"
                assert host.address == reply.announced_address
                if host.server.bulk is not None:
                    assert reply.bulk_address == f"localhost:{host.server.bulk.port}"

        # the DHT node's contact: what a node joining now learns
        other = await DHTNode.launch([PeerAddress.parse(dht.node.address)], wire=LOCAL)
        contact = other.routing.get(dht.host.identity.peer_id)
        assert contact is not None and contact.endpoint == Endpoint("localhost", dht.host.server.port)

        # the expert declaration, re-declared at the new address
        async def declared() -> bool:
            return (await find_experts(client, ["ffn.0.0"]))["ffn.0.0"] == experts.host.address
        await eventually(declared)

        # the state donor's record
        async def donor() -> bool:
            found = await client.get(donors_key("run"), latest=True)
            entry = found.value.get(averager.host.identity.peer_id) if found is not None else None
            return entry is not None and entry.value["bulk"] == f"localhost:{averager.host.server.bulk.port}"
        await eventually(donor)

        # an averaging announcement (alone: no group forms, but it announced itself)
        assert await node.step() is None
        found = await client.get(f"run.groups.{node._group_key(1, '')}", latest=True)
        announcement = found.value[averager.host.identity.peer_id].value
        assert announcement["address"] == f"localhost:{averager.host.server.port}"
        assert announcement["bulk"] == f"localhost:{averager.host.server.bulk.port}"
    finally:
        if trainer is not None:
            await trainer.close()
        if other is not None:
            await other.shutdown()
        await client.pool.close()
        await averager.host.shutdown()
        await experts.host.shutdown()
        await dht.host.shutdown()
