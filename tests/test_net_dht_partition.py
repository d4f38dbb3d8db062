"""A partition splits a swarm of `apiary dht` processes in two; after it heals, what either half
stored while apart is found from both.

Eight hosts in network namespaces, 20 ms of round trip on every link (so each pair of hosts
is 40 ms apart), one `apiary dht` process each, joined through host 0. The partition cuts the
switch in two: hosts 0-3 and hosts 4-7 cannot reach each other, so every call across times
out, as on the internet, and each node drops the other half from its routing table. The
partition lasts longer than gRPC's keepalive (60 s + 20 s), so the connections across are
dead by the heal: the halves must find each other again by pinging the nodes they dropped
(`reping_period`, 15 s), not through connections that survived.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from net.network import Host, Link, Network, skip_reason
from net.processes import HostProcess

from apiary.dht.api import DHTClient
from apiary.wire import ChannelPool, Endpoint

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

HOSTS = 8
PORT = "7000"
PARTITION_SECONDS = 90.0  # longer than gRPC's keepalive: 60 s, then 20 s for the answer
HEARTBEAT_SECONDS = 10.0  # while apart, every node writes this often (as live peers do)
HEAL_DEADLINE = 60.0  # seconds after the heal for every node to know and find every other


def start_swarm(net: Network) -> list[HostProcess]:
    first = net.hosts[0].apiary("dht", "--new-swarm", "--port", PORT)
    bootstrap = first.wait_for(r"others join with: --initial-peers (\S+)").group(1)
    others = [host.apiary("dht", "--port", PORT, "--initial-peers", bootstrap) for host in net.hosts[1:]]
    processes = [first, *others]
    for process in processes:
        process.wait_for(r"local API: (\S+)")
    return processes


def local_api(host: Host, process: HostProcess) -> Endpoint:
    """The node's local API (on its host's 127.0.0.1), reachable from the test process."""
    return host.forward(Endpoint.parse(process.wait_for(r"local API: (\S+)").group(1)))


async def routing_table_sizes(clients: list[DHTClient]) -> list[int]:
    return [info.routing_table_size for info in await asyncio.gather(*(c.info() for c in clients))]


@pytest.fixture
def network() -> Iterator[Network]:
    with Network([Link(rtt_ms=20)] * HOSTS) as net:
        yield net
    assert net.leftovers() == []


@pytest.mark.timeout(240)
async def test_values_stored_in_either_half_are_found_from_both_after_the_partition_heals(network: Network) -> None:
    processes = start_swarm(network)
    endpoints = [local_api(host, process) for host, process in zip(network.hosts, processes)]
    left, right = network.hosts[:4], network.hosts[4:]
    expiration = time.time() + 600
    async with ChannelPool() as pool:
        clients = [DHTClient(endpoint, pool, timeout=60) for endpoint in endpoints]
        assert await clients[2].store("before", "whole", expiration)
        assert [found.value for found in await asyncio.gather(*(c.get("before") for c in clients))] == ["whole"] * HOSTS

        network.partition(left, right)
        split = time.monotonic()
        # every node writes while apart (as live peers do: heartbeats, progress), so every node
        # also learns that the other half is unreachable
        keys = [f"h{i}-{uuid.uuid4().hex}" for i in range(HOSTS)]
        stored = await asyncio.gather(*(c.store(key, f"written by h{i}", expiration)
                                        for i, (c, key) in enumerate(zip(clients, keys))))
        assert all(stored), stored
        # the partition is real: each half sees its own values only, and knows only its own half
        while_apart = await asyncio.gather(*(c.get_many(keys) for c in clients))
        assert [[value is not None for value in row] for row in while_apart] == \
            [[i // 4 == j // 4 for j in range(HOSTS)] for i in range(HOSTS)]
        while time.monotonic() - split < PARTITION_SECONDS:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            now = time.time()
            beats = await asyncio.gather(*(c.store(f"heartbeat of h{i}", now, now + 60) for i, c in enumerate(clients)))
            assert all(beats), beats
        assert await routing_table_sizes(clients) == [3] * HOSTS

        network.heal()
        healed = time.monotonic()
        missing: list[str] = []
        while time.monotonic() - healed < HEAL_DEADLINE:
            sizes = await routing_table_sizes(clients)
            results = await asyncio.gather(*(c.get_many(keys) for c in clients))
            missing = [f"h{i} misses h{j}'s" for i, found in enumerate(results)
                       for j, value in enumerate(found) if value is None]
            if not missing and sizes == [HOSTS - 1] * HOSTS:
                break
            await asyncio.sleep(2.0)
        converged = time.monotonic() - healed
        assert not missing, f"{HEAL_DEADLINE:.0f}s after the heal, still not found: {missing}"
        assert sizes == [HOSTS - 1] * HOSTS, f"{HEAL_DEADLINE:.0f}s after the heal, routing tables: {sizes}"
        print(f"after {healed - split:.0f}s apart, every node knew every other and found every value "
              f"{converged:.1f}s after the heal")
        found = await asyncio.gather(*(c.get_many(keys) for c in clients))
        assert [[value.value for value in row] for row in found] == [[f"written by h{i}" for i in range(HOSTS)]] * HOSTS
    for process in processes:
        assert process.alive, process.report()
