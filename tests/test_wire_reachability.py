"""Reachability: the addresses peers observe (Ping and DHT replies, the majority of distinct
reporters, the line that reports a wrong announced host) and dial-back checks (real servers on
loopback: verdicts, nonces, the caller's own host only, the rate limit)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from wire_helpers.services import unused_port

from apiary.dht import DHTNode
from apiary.dht.protocol import NODE_SERVICE
from apiary.dht.protos.dht_pb2 import PingRequest as DHTPingRequest
from apiary.wire import (
    PROBE,
    AccessDenied,
    ChannelPool,
    Endpoint,
    Identity,
    OverLimit,
    PeerAddress,
    RequestRejected,
    RpcClient,
    RpcServer,
    WireSettings,
)
from apiary.wire.auth import AccessToken
from apiary.wire.observed import ObservedAddresses, announce_problem, host_scope, observed_endpoint
from apiary.wire.protos.wire_pb2 import DialBackRequest, PingRequest
from apiary.wire.reachability import DIAL_BACK, DIAL_BACK_BURST, Verdict, check_reachability

LOCAL = WireSettings(listen_host="127.0.0.1")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---- observed addresses ----

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_ping_tells_the_caller_the_address_its_call_came_from(host: str) -> None:
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this host")
    server = RpcServer(WireSettings(listen_host=host), Identity.generate())
    await server.start()
    try:
        async with ChannelPool(server.settings) as pool:
            reply = await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest(), timeout=10)
        observed = Endpoint.parse(reply.observed_address)
        assert observed.host == host
        assert 0 < observed.port != server.port  # the caller's own (ephemeral) port
    finally:
        await server.stop()


def test_transport_peers_of_every_form_are_parsed() -> None:
    assert observed_endpoint("ipv4:198.18.0.7:40123") == Endpoint("198.18.0.7", 40123)
    assert observed_endpoint("ipv6:%5B2001:db8::5%5D:443") == Endpoint("2001:db8::5", 443)
    assert observed_endpoint("ipv6:[::1]:5000") == Endpoint("::1", 5000)
    assert observed_endpoint("ipv6:%5B::ffff:198.18.0.2%5D:80") == Endpoint("198.18.0.2", 80)  # dual-stack socket
    assert observed_endpoint("unix:/tmp/apiary.sock") is None
    assert observed_endpoint("ipv4:not-an-ip:1") is None


async def test_dht_replies_tell_the_caller_its_address_and_a_joining_node_learns_the_majority() -> None:
    first = await DHTNode.launch()
    second = await DHTNode.launch([PeerAddress.parse(first.address)])
    newcomer = await DHTNode.launch([PeerAddress.parse(first.address), PeerAddress.parse(second.address)])
    try:
        assert first.server is not None
        async with ChannelPool(first.server.settings) as pool:
            reply = await RpcClient(pool, NODE_SERVICE, first.server.local_endpoint).call(
                "Ping", DHTPingRequest(), timeout=10)
        assert Endpoint.parse(reply.observed_address).host == "127.0.0.1"
        # two distinct nodes answered the newcomer, each saying where its calls come from
        assert len(newcomer.observed) >= 2
        assert newcomer.observed.majority() == "127.0.0.1"
    finally:
        for node in (newcomer, second, first):
            await node.shutdown()


def test_the_majority_needs_a_quorum_of_distinct_reporters() -> None:
    observed = ObservedAddresses(quorum=2)
    assert observed.majority() is None
    observed.report("peer-a", "198.18.0.7")
    assert observed.majority() is None  # one peer's word is never enough
    observed.report("peer-a", "198.18.0.7")
    assert observed.majority() is None  # nor is the same peer saying it twice
    observed.report("peer-b", "198.18.0.7")
    assert observed.majority() == "198.18.0.7"


def test_one_liar_cannot_move_the_majority() -> None:
    observed = ObservedAddresses(quorum=2)
    for peer in ("peer-a", "peer-b", "peer-c"):
        observed.report(peer, "198.18.0.7")
    observed.report("liar", "198.51.100.66")
    for _ in range(10):  # repeating itself does not count more
        observed.report("liar", "198.51.100.66")
    assert observed.majority() == "198.18.0.7"


def test_a_split_has_no_majority_and_a_new_report_replaces_the_old() -> None:
    observed = ObservedAddresses(quorum=2)
    observed.report("peer-a", "198.18.0.7")
    observed.report("peer-b", "198.18.0.7")
    observed.report("peer-c", "198.18.0.9")
    observed.report("peer-d", "198.18.0.9")
    assert observed.majority() is None  # two against two: no host has more than half
    observed.report("peer-d", "198.18.0.7")  # peer-d now sees the node elsewhere (its NAT mapping changed)
    assert observed.majority() == "198.18.0.7"
    assert len(observed) == 4


def test_a_larger_quorum_is_honoured() -> None:
    observed = ObservedAddresses(quorum=3)
    observed.report("peer-a", "198.18.0.7")
    observed.report("peer-b", "198.18.0.7")
    assert observed.majority() is None
    observed.report("peer-c", "198.18.0.7")
    assert observed.majority() == "198.18.0.7"
    with pytest.raises(ValueError, match="at least 2 distinct reporters"):
        ObservedAddresses(quorum=1)


@pytest.mark.parametrize(("host", "scope"), [
    ("8.8.8.8", "public"),
    ("2606:4700::1111", "public"),
    ("198.18.0.2", "public"),  # RFC 2544: tests/net's model of the internet
    ("198.19.255.1", "public"),
    ("10.1.0.5", "private"),
    ("172.17.0.2", "private"),
    ("192.168.1.5", "private"),
    ("100.64.0.9", "private"),  # carrier-grade NAT
    ("fd00::5", "private"),
    ("0.0.0.0", "private"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("169.254.10.1", "link-local"),
    ("fe80::1", "link-local"),
    ("192.0.2.10", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.7", "documentation"),
    ("2001:db8::7", "documentation"),
    ("[2001:db8::7]", "documentation"),
    ("peer.example.org", "name"),
])
def test_host_scopes(host: str, scope: str) -> None:
    assert host_scope(host) == scope


@pytest.mark.parametrize(("announced", "why"), [
    ("192.168.1.5", "a private address"),
    ("127.0.0.1", "a loopback address"),
    ("169.254.3.4", "a link-local address"),
    ("203.0.113.7", "a documentation address"),
])
def test_a_wrong_announced_host_is_reported_with_the_observed_one(announced: str, why: str) -> None:
    line = announce_problem(announced, "198.18.0.3")
    assert line is not None and "\n" not in line
    assert line.startswith(f"announced host {announced} is {why}")
    assert "peers see this node at 198.18.0.3" in line
    assert "--announce-host 198.18.0.3" in line and "APIARY_ANNOUNCE_HOST" in line


@pytest.mark.parametrize(("announced", "observed"), [
    ("198.18.0.3", "198.18.0.3"),  # right
    ("8.8.4.4", "198.18.0.3"),  # public, just not the one observed (a multi-homed host): not ours to judge
    ("peer.example.org", "198.18.0.3"),  # a name: not resolved here
    ("192.168.1.5", "192.168.1.9"),  # a LAN-only swarm: private is right
    ("192.168.1.5", None),  # nothing observed yet
])
def test_nothing_is_reported_when_the_announced_host_is_fine(announced: str, observed: str | None) -> None:
    assert announce_problem(announced, observed) is None


# ---- dial-back checks ----

@asynccontextmanager
async def servers(count: int, settings: WireSettings = LOCAL) -> AsyncIterator[list[RpcServer]]:
    started: list[RpcServer] = []
    try:
        for _ in range(count):
            server = RpcServer(settings, Identity.generate())
            await server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
            await server.stop(0)


def address(server: RpcServer) -> PeerAddress:
    return PeerAddress(server.local_endpoint, server.identity.peer_id)


async def check(node: RpcServer, helpers: list[RpcServer], **kwargs: object):  # type: ignore[no-untyped-def]
    async with ChannelPool.like(node) as pool:
        return await check_reachability(node, pool, [address(h) for h in helpers], **kwargs)  # type: ignore[arg-type]


async def test_a_node_dialled_back_at_its_announced_ports_is_public() -> None:
    async with servers(1) as (node,), servers(3) as helpers:
        report = await check(node, [*helpers, node])  # itself among the peers: never its own helper
        assert report.verdict == Verdict.PUBLIC, report.detail
        assert report.observed_host == "127.0.0.1"
        assert len(report.asked) == 2 and set(report.asked) <= {str(address(h)) for h in helpers}
        assert node.bulk is not None
        assert f"127.0.0.1:{node.port}" in report.detail and f"127.0.0.1:{node.bulk.port}" in report.detail


async def test_a_node_without_bulk_server_needs_only_its_grpc_port_reached() -> None:
    async with servers(1, WireSettings(listen_host="127.0.0.1", bulk=False)) as (node,), servers(2) as helpers:
        report = await check(node, helpers)
        assert report.verdict == Verdict.PUBLIC, report.detail


async def test_a_node_announcing_a_port_nobody_listens_on_is_behind_nat() -> None:
    closed = unused_port()
    async with servers(1, WireSettings(listen_host="127.0.0.1", announce_port=closed)) as (node,), \
            servers(3) as helpers:
        report = await check(node, helpers)
        assert report.verdict == Verdict.BEHIND_NAT, report.detail
        assert f"127.0.0.1:{closed} (gRPC)" in report.detail


async def test_a_closed_bulk_port_is_behind_nat() -> None:
    closed = unused_port()
    async with servers(1, WireSettings(listen_host="127.0.0.1", announce_bulk_port=closed)) as (node,), \
            servers(2) as helpers:
        report = await check(node, helpers)
        assert report.verdict == Verdict.BEHIND_NAT, report.detail
        assert f"127.0.0.1:{closed} (bulk)" in report.detail


async def test_too_few_helpers_is_unknown() -> None:
    async with servers(1) as (node,), servers(1) as helpers:
        report = await check(node, helpers)
        assert report.verdict == Verdict.UNKNOWN and "1 of the 1 peers asked answered" in report.detail
        assert (await check(node, [])).verdict == Verdict.UNKNOWN
        gone = [PeerAddress(Endpoint("127.0.0.1", unused_port())) for _ in range(3)]
        async with ChannelPool.like(node) as pool:
            report = await check_reachability(node, pool, gone, timeout=3.0)
        assert report.verdict == Verdict.UNKNOWN and report.observed_host is None and report.asked == ()


async def test_another_process_at_the_announced_address_does_not_count() -> None:
    # plaintext, so that nothing but the nonce tells the node from whoever answers at its address
    plain = WireSettings(listen_host="127.0.0.1", tls=False)
    async with servers(1, plain) as (impostor,), servers(2, plain) as helpers:
        assert impostor.bulk is not None
        misdirected = plain.model_copy(update={"announce_port": impostor.port, "announce_bulk_port": impostor.bulk.port})
        async with servers(1, misdirected) as (node,):
            report = await check(node, helpers)
            assert report.verdict == Verdict.BEHIND_NAT, report.detail
            assert "no reachability check of this peer awaits" in report.detail
            async with servers(1, plain) as (honest,):  # the same helpers vouch for a node at its own address
                assert (await check(honest, helpers)).verdict == Verdict.PUBLIC


async def test_the_helper_dials_the_callers_observed_host_never_one_it_names() -> None:
    assert [field.name for field in DialBackRequest.DESCRIPTOR.fields] == ["nonce", "grpc_port", "bulk_port", "peer_id"]
    documented = WireSettings(listen_host="127.0.0.1", announce_host="203.0.113.9")  # wrong, and unroutable
    async with servers(1, documented) as (node,), servers(2) as helpers:
        assert node.announced.host == "203.0.113.9"
        report = await check(node, helpers)
        assert report.verdict == Verdict.PUBLIC, report.detail  # reached where its calls come from
        nonce = os.urandom(32)
        async with ChannelPool.like(node) as pool:
            with node.dial_backs.awaiting(nonce):
                reply = await RpcClient(pool, DIAL_BACK, helpers[0].local_endpoint).call(
                    "DialBack", DialBackRequest(nonce=nonce, grpc_port=node.port, peer_id=node.identity.peer_id))
        assert reply.grpc_reached and Endpoint.parse(reply.grpc_address) == Endpoint("127.0.0.1", node.port)
        assert reply.bulk_address == "" and not reply.bulk_reached  # no bulk port asked: none dialled


async def test_in_a_private_run_token_holders_check_each_other_and_strangers_are_refused() -> None:
    authority = Identity.generate()
    members = [Identity.generate() for _ in range(3)]
    started = []
    try:
        for identity in members:
            token = AccessToken.issue(authority, identity.peer_id, 600).encode()
            server = RpcServer(WireSettings(listen_host="127.0.0.1", run_authority=authority.peer_id,
                                            access_token=token), identity)
            await server.start()
            started.append(server)
        node, *helpers = started
        report = await check(node, helpers)
        assert report.verdict == Verdict.PUBLIC, report.detail
        async with ChannelPool(LOCAL) as stranger:
            with pytest.raises(AccessDenied):
                await RpcClient(stranger, DIAL_BACK, helpers[0].local_endpoint).call(
                    "DialBack", DialBackRequest(nonce=os.urandom(32), grpc_port=node.port), timeout=10)
    finally:
        for server in started:
            await server.stop(0)


async def test_dial_backs_are_rate_limited_per_caller_host_and_the_helper_keeps_serving() -> None:
    closed = unused_port()
    async with servers(1) as (helper,):
        async with ChannelPool(LOCAL) as pool:
            client = RpcClient(pool, DIAL_BACK, helper.local_endpoint, timeout=10)
            with pytest.raises(RequestRejected, match="a nonce of 3 bytes"):
                await client.call("DialBack", DialBackRequest(nonce=b"abc", grpc_port=closed))
            answered, refusals = 0, []
            for _ in range(DIAL_BACK_BURST + 3):
                try:
                    reply = await client.call("DialBack", DialBackRequest(nonce=os.urandom(32), grpc_port=closed))
                    assert not reply.grpc_reached and reply.grpc_error
                    answered += 1
                except OverLimit as e:
                    refusals.append(str(e))
            assert answered == DIAL_BACK_BURST and len(refusals) == 3
            assert "RESOURCE_EXHAUSTED" in refusals[0] and "DialBack refused" in refusals[0]
            assert "dial-backs per second" in refusals[0]
            ping = await RpcClient(pool, PROBE, helper.local_endpoint).call("Ping", PingRequest(), timeout=10)
            assert ping.peer_id == helper.identity.peer_id
