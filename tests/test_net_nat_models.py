"""The test network's real NATs behave as the models they stand for, seen with plain sockets.

Seven hosts: two public ones running `net.tools observe` (each tells a caller the address its
connection came from, as STUN does), two behind cone NATs, two behind symmetric NATs and one
behind a firewall. What the reachability tests rely on:
- a NATed host's connections come from its router's public address;
- cone: one source port maps to one public port whatever the destination; symmetric: each
  destination sees another port;
- nothing reaches a NATed or firewalled host that it did not ask for (a time-out, not a refusal);
- two cone-NATed hosts that know each other's mapped ports connect by TCP simultaneous open
  (what hole punching does); with a symmetric NAT on either side the same attempt fails;
- rates and latency still apply to a host behind a NAT.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest
from net.network import Host, Link, Network, nat_skip_reason, skip_reason
from net.processes import HostProcess

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

OBSERVE, LISTEN, ECHO, SINK = 5004, 5003, 5002, 5001
SHAPED_CONE = Link(nat="cone", rtt_ms=40, rate_mbit=50)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    reason = nat_skip_reason()
    if reason:
        pytest.skip(reason)
    links = [Link(), Link(), SHAPED_CONE, Link(nat="cone"), Link(nat="symmetric"), Link(nat="symmetric"),
             Link(nat="firewall")]
    with Network(links) as net:
        for host in net.hosts[:2]:
            host.python("-m", "net.tools", "observe", "--port", str(OBSERVE)).wait_for("listening", 20)
        yield net
    assert net.leftovers() == []


def tool(host: Host, *args: str) -> HostProcess:
    return host.python("-m", "net.tools", *args)


def mapping(host: Host, source_port: int, *observers: Host) -> list[tuple[str, int]]:
    """The (host, port) each observer saw a connection from `host`'s `source_port` come from."""
    to = [arg for observer in observers for arg in ("--to", f"{observer.address}:{OBSERVE}")]
    report = tool(host, "mapped", *to, "--source-port", str(source_port), "--timeout", "5").result(30)
    return [(seen.rpartition(":")[0], int(seen.rpartition(":")[2])) for seen in report["observed"]]


def test_hosts_behind_a_nat_are_seen_with_their_routers_address(network: Network) -> None:
    h0, h1, cone, cone2, symmetric, _, firewall = network.hosts
    assert cone.address == "10.3.0.2" and cone.public_address == "198.18.0.3"
    assert firewall.address == firewall.public_address == "198.18.0.7"
    assert h0.address == h0.public_address == "198.18.0.1"

    for host in (cone, cone2):  # endpoint-independent: the source port survives, for every destination
        assert mapping(host, 40001, h0, h1) == [(host.public_address, 40001)] * 2
    seen = mapping(symmetric, 40001, h0, h1)  # a new port per destination
    assert [address for address, _ in seen] == [symmetric.public_address] * 2
    assert seen[0][1] != seen[1][1], seen
    assert mapping(firewall, 40001, h0, h1) == [(firewall.address, 40001)] * 2  # no translation


def test_nothing_unsolicited_reaches_a_host_behind_a_nat_or_firewall(network: Network) -> None:
    h0, h1, *guarded = network.hosts
    for host in [h1, *guarded]:
        tool(host, "listen", "--port", str(LISTEN)).wait_for("listening", 20)
    attempts = {host.name: tool(h0, "connect", "--to", f"{host.public_address}:{LISTEN}", "--timeout", "2")
                for host in [h1, *guarded]}
    private = tool(h0, "connect", "--to", f"{guarded[0].address}:{LISTEN}", "--timeout", "2")
    results = {name: attempt.result(30) for name, attempt in attempts.items()}
    assert results.pop("h1")["connected"] is True  # the listeners listen
    for name, result in results.items():  # dropped, never refused: the caller times out
        assert result["connected"] is False and "timed out" in str(result["error"]), (name, result)
    assert private.result(30)["connected"] is False  # a private address is not routed on the switch
    outbound = tool(guarded[0], "connect", "--to", f"{h1.address}:{LISTEN}").result(30)
    assert outbound["connected"] is True, outbound


def punch(a: Host, b: Host, port: int, observer: Host, timeout: float = 6.0) -> tuple[dict, dict]:
    """Each host learns its mapping of `port` from `observer`, then both connect to the other's
    mapping from `port` at the same time; returns both reports."""
    (a_seen,), (b_seen,) = mapping(a, port, observer), mapping(b, port, observer)
    attempts = [tool(x, "punch", "--to", f"{seen[0]}:{seen[1]}", "--source-port", str(port), "--timeout",
                     str(timeout), "--message", f"from {x.name}")
                for x, seen in ((a, b_seen), (b, a_seen))]
    first, second = (attempt.result(timeout + 20) for attempt in attempts)
    return first, second


def test_cone_nats_open_a_tcp_connection_by_simultaneous_open_and_symmetric_ones_do_not(network: Network) -> None:
    h0, _, cone, cone2, symmetric, symmetric2, _ = network.hosts
    a, b = punch(cone, cone2, 41000, h0)
    assert a["connected"] and b["connected"], (a, b)
    assert (a["heard"], b["heard"]) == (f"from {cone2.name}", f"from {cone.name}")

    for x, y in ((symmetric, symmetric2), (cone2, symmetric)):
        a, b = punch(x, y, 41001, h0, timeout=4.0)
        assert not a["connected"] and not b["connected"], (x, y, a, b)
        assert "timed out" in a["error"] and "timed out" in b["error"], (a, b)


def test_latency_and_rate_apply_behind_a_nat(network: Network) -> None:
    h0, h1, shaped = network.hosts[:3]
    tool(h0, "echo", "--port", str(ECHO)).wait_for("listening", 20)
    rtts = tool(shaped, "ping", "--to", f"{h0.address}:{ECHO}", "--count", "10", "--interval", "0.02").result(30)
    assert 40 <= statistics.median(rtts["rtts_ms"][1:]) <= 40 * 1.2, rtts
    sink = tool(h1, "sink", "--port", str(SINK), "--skip", "1.0")
    sink.wait_for("listening", 20)
    tool(shaped, "source", "--to", f"{h1.address}:{SINK}", "--seconds", "3")
    assert 50 * 0.85 <= sink.result(40)["mbit_per_s"] <= 50 * 1.15
