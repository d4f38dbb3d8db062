"""Hole punching through real NATs (apiary.wire.relay.punch): two peers behind cone NATs that
reach each other through a public relay move to a direct connection; behind symmetric NATs
they stay relayed, and their calls still work.

Five hosts in network namespaces: a public relay, a target and a dialer behind cone NATs (one
router each), a target and a dialer behind symmetric NATs. Each target keeps a reservation at
the relay; each dialer knows only its target's relayed endpoint and makes gRPC and bulk calls
(`net.punch_peers`). What the relay carries is read from the relay process itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from net.network import Host, Link, Network, nat_skip_reason, skip_reason
from net.processes import HostProcess

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

MIB = 1 << 20
CONE, SYMMETRIC = Link(nat="cone", rtt_ms=10), Link(nat="symmetric", rtt_ms=10)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    reason = nat_skip_reason()
    if reason:
        pytest.skip(reason)
    with Network([Link(rtt_ms=10), CONE, CONE, SYMMETRIC, SYMMETRIC]) as net:
        yield net
    assert net.leftovers() == []


def peers(host: Host, *args: str) -> HostProcess:
    return host.python("-m", "net.punch_peers", *args, stdin=True, name=f"{host.name}: {args[0]}")


@pytest.fixture(scope="module")
def relay(network: Network) -> tuple[HostProcess, str]:
    """The relay process on the public host, and its address."""
    host = network.hosts[0]
    process = peers(host, "relay", "--host", host.address)
    return process, process.result(30)["relay"]


def ask(process: HostProcess, command: str, timeout: float = 60) -> dict:
    process.send(command)
    return process.result(timeout)


def quiet(relay: HostProcess, timeout: float = 20) -> dict:
    """The relay's stats once no circuit is open any more (old connections closed)."""
    deadline = time.monotonic() + timeout
    while (stats := ask(relay, "stats"))["circuits"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["circuits"] == 0, stats
    return stats


def pair(relay_address: str, target_host: Host, dialer_host: Host) -> HostProcess:
    """Starts a target with a reservation at the relay and a dialer of its relayed endpoint."""
    target = peers(target_host, "target", "--host", target_host.address, "--relay", relay_address)
    endpoint = target.result(30)["endpoint"]
    assert "/via/" in endpoint
    dialer = peers(dialer_host, "dialer", "--endpoint", endpoint)
    dialer.result(30)
    return dialer


def test_cone_nats_upgrade_to_a_direct_connection_and_the_relay_carries_no_new_bytes(
        network: Network, relay: tuple[HostProcess, str]) -> None:
    relay_process, relay_address = relay
    dialer = pair(relay_address, network.hosts[1], network.hosts[2])
    first = ask(dialer, "calls")  # through the relay; a gRPC and a bulk punch start in the background
    assert (first["grpc"], first["bulk"]) == (MIB, MIB), first
    assert ask(relay_process, "stats")["bytes"] > 2 * MIB
    settled = ask(dialer, "settle")
    assert settled["failed"] == 0 and settled["succeeded"] == settled["attempted"] == 2, settled
    ask(dialer, "calls")  # new connections: the gRPC channel moved, the bulk connection is a new, direct one
    before = quiet(relay_process)
    for _ in range(3):
        done = ask(dialer, "calls")
        assert (done["grpc"], done["bulk"]) == (MIB, MIB), done
    after = ask(relay_process, "stats")
    assert after["bytes"] == before["bytes"], (before, after)  # 6 MiB moved, none of it through the relay
    assert done["attempted"] == 2  # no connection went through the relay again


def test_symmetric_nats_stay_relayed_and_still_work(network: Network, relay: tuple[HostProcess, str]) -> None:
    relay_process, relay_address = relay
    dialer = pair(relay_address, network.hosts[3], network.hosts[4])
    before = ask(relay_process, "stats")
    first = ask(dialer, "calls")
    assert (first["grpc"], first["bulk"]) == (MIB, MIB), first
    settled = ask(dialer, "settle")
    assert settled["failed"] == settled["attempted"] >= 1 and settled["succeeded"] == 0, settled
    for _ in range(2):
        done = ask(dialer, "calls")
        assert (done["grpc"], done["bulk"]) == (MIB, MIB), done
    assert done["attempted"] == settled["attempted"]  # not punched again: it stays relayed
    assert ask(relay_process, "stats")["bytes"] - before["bytes"] > 6 * MIB  # every call went through the relay
