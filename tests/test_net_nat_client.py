"""A peer behind a NAT joins as a client: it reads and writes the DHT, sends its part in
averaging with public peers and trains through remote experts, though nobody can dial it.

Four hosts in network namespaces: three public (20 ms of round trip each) and one whose link
lets in only answers to connections it opened (40 ms). Each runs `apiary dht` and
`apiary averager` as a participant would; the NAT peer runs both in client mode. The test is
the four trainers: it hands each averager its tensors through the averager's local API. One
public participant also runs `apiary expert-server` (declaring through its dht service), and
the NAT peer trains a model through those experts (`net.moe_client`, finding them through its
own client-mode dht service).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch
from net.experts import start_expert_server, wait_until_declared
from net.network import Host, Link, Network, skip_reason
from net.processes import HostProcess

from apiary.averaging.api.client import AveragerClient
from apiary.dht.api import DHTClient
from apiary.wire import ChannelPool, Endpoint

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PUBLIC = Link(rtt_ms=20)
BEHIND_NAT = Link(rtt_ms=40, dial_out_only=True)
DHT_PORT, AVERAGER_PORT, BULK_PORT = "7000", "7100", "7101"
ROUND_OPTIONS = ("--run-id", "nat-test", "--target-group-size", "4", "--min-group-size", "4", "--expected-peers", "4",
                 "--gather-seconds", "2", "--join-seconds", "5", "--round-timeout", "30", "--sender-timeout", "10",
                 "--port", AVERAGER_PORT, "--bulk-port", BULK_PORT)
SHAPES = [(256, 32), (77,)]
WEIGHTS = [1.0, 2.0, 1.5, 3.0]


@pytest.fixture
def network() -> Iterator[Network]:
    with Network([PUBLIC, PUBLIC, PUBLIC, BEHIND_NAT]) as net:
        yield net
    assert net.leftovers() == []


def local_api(host: Host, process: HostProcess) -> Endpoint:
    """The service's local API, reachable from the test process."""
    return host.forward(Endpoint.parse(process.wait_for(r"local API: (\S+)").group(1)))


def can_connect(source: Host, target: Host, port: str) -> dict[str, object]:
    return source.python("-m", "net.tools", "connect", "--to", f"{target.address}:{port}", "--timeout", "3").result(20)


async def test_a_peer_behind_nat_uses_the_dht_and_averages_as_a_client(network: Network) -> None:
    *public, nat = network.hosts
    first = public[0].apiary("dht", "--new-swarm", "--port", DHT_PORT)
    bootstrap = first.wait_for(r"others join with: --initial-peers (\S+)").group(1)
    dhts = [first, *(h.apiary("dht", "--port", DHT_PORT, "--initial-peers", bootstrap) for h in public[1:]),
            nat.apiary("dht", "--client-mode", "--initial-peers", bootstrap)]
    dht_locals = [process.wait_for(r"local API: (\S+)").group(1) for process in dhts]
    averagers = [host.apiary("averager", *ROUND_OPTIONS, "--dht-local", dht_local,
                             *(("--mode", "client") if host is nat else ()))
                 for host, dht_local in zip(network.hosts, dht_locals)]
    experts = start_expert_server(public[1], "ffn.0.[0:2]", "--dht-local", dht_locals[1])
    for averager in averagers:
        averager.wait_for(r"local API: (\S+)")

    # the NAT is real: the peer dials out, nobody dials in (the SYN is dropped: a time-out, not a refusal)
    assert can_connect(nat, public[0], AVERAGER_PORT)["connected"] is True
    dialled_in = can_connect(public[0], nat, AVERAGER_PORT)
    assert dialled_in["connected"] is False and "timed out" in str(dialled_in["error"]), dialled_in

    expiration = time.time() + 300
    async with ChannelPool() as pool:
        dht = [DHTClient(local_api(host, process), pool, timeout=30) for host, process in zip(network.hosts, dhts)]
        assert await dht[3].store("written behind the nat", {"by": "h3"}, expiration)
        assert await dht[1].store("written in public", {"by": "h1"}, expiration)
        assert (await dht[0].get("written behind the nat")).value == {"by": "h3"}
        assert (await dht[2].get("written behind the nat")).value == {"by": "h3"}
        assert (await dht[3].get("written in public")).value == {"by": "h1"}

        trainers = [AveragerClient(local_api(host, process), pool, timeout=20, round_timeout=60)
                    for host, process in zip(network.hosts, averagers)]
        generator = torch.Generator().manual_seed(9)
        inputs = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in network.hosts]
        tensors = [[t.clone() for t in ts] for ts in inputs]
        for trainer, ts in zip(trainers, tensors):
            await trainer.register(ts, use_shared_memory=False)
        sizes = await asyncio.wait_for(
            asyncio.gather(*(t.average(ts, weight=w) for t, ts, w in zip(trainers, tensors, WEIGHTS))), 90)
    assert sizes == [4, 4, 4, 4], [t.last_outcome for t in trainers]
    for index, parts in enumerate(zip(*inputs)):
        expected = sum(w * x.double() for w, x in zip(WEIGHTS, parts)) / sum(WEIGHTS)
        for peer in range(4):  # the NAT peer's part is in everyone's mean, and it gets the mean too
            torch.testing.assert_close(tensors[peer][index].double(), expected, atol=1e-5, rtol=1e-5)

    # remote experts, called from behind the NAT: found through its client-mode dht service
    wait_until_declared(public[1], experts)
    trainer = nat.python("-m", "net.moe_client", "--dht-local", dht_locals[3], "--grid", "1,2", "--k-best", "2",
                         "--k-min", "2", "--steps", "20", "--timeout", "5", env={"OMP_NUM_THREADS": "1"},
                         name="moe trainer behind the nat")
    report = trainer.result(120)
    assert trainer.wait(10) == 0, trainer.report()
    assert len(report["steps"]) == 20
    assert all(step["answered"] == {"0": 64} for step in report["steps"]), report["steps"]  # 32 samples × 2 experts
    assert report["loss_end"] < report["loss_start"], report

    for process in [*dhts, *averagers, experts]:
        assert process.alive, process.report()
