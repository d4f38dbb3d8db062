"""What callers see: errors mapped to WireError subclasses, deadlines, channel reuse, bulk errors."""

# Plaintext here, asked for explicitly: these tests open raw channels and sockets to check the
# wire's own mechanics; the same paths over TLS (the default) are covered by test_trust_tls.py.

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest
import torch
from wire_helpers.services import TROUBLE, Trouble, crash_route, echo_route, eventually, reject_route, slow_route, unused_port
from wire_helpers.tensors import assert_bit_exact

from apiary.wire import (
    PROBE,
    ChannelPool,
    DeadlineExceeded,
    Endpoint,
    Identity,
    OverLimit,
    PeerUnavailable,
    RemoteFailure,
    RequestRejected,
    RpcClient,
    RpcServer,
    WireSettings,
)
from apiary.wire.bulk import BulkClient
from apiary.wire.protos.wire_pb2 import PingRequest
from apiary.wire.tensors import tensor_from_payload, tensor_payload


@pytest.fixture
async def trouble() -> Trouble:
    return Trouble()


@pytest.fixture
async def server(trouble: Trouble) -> AsyncIterator[RpcServer]:
    server = RpcServer(WireSettings(tls=False, listen_host="127.0.0.1", shutdown_grace=0.5), Identity.generate())
    server.add_service(TROUBLE, trouble)
    await server.start()
    assert server.bulk is not None
    server.bulk.add_route("test/slow", slow_route)
    server.bulk.add_route("test/crash", crash_route)
    server.bulk.add_route("test/reject", reject_route)
    server.bulk.add_route("test/echo", echo_route)
    yield server
    await server.stop(0)


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    async with ChannelPool(WireSettings(tls=False, default_timeout=10)) as pool:
        yield pool


@pytest.fixture
async def bulk() -> AsyncIterator[BulkClient]:
    client = BulkClient(WireSettings(tls=False, default_timeout=10))
    yield client
    await client.close()


async def assert_serving(pool: ChannelPool, server: RpcServer) -> None:
    reply = await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest(), timeout=5)
    assert reply.peer_id == server.identity.peer_id


async def test_nothing_listening_is_peer_unavailable_quickly(pool: ChannelPool) -> None:
    endpoint = Endpoint("127.0.0.1", unused_port())
    started = time.monotonic()
    with pytest.raises(PeerUnavailable) as raised:
        await RpcClient(pool, PROBE, endpoint).call("Ping", PingRequest(), timeout=20)
    assert time.monotonic() - started < 5  # refused at once, not at the deadline
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.peer == str(endpoint)
    assert str(endpoint) in str(raised.value) and "apiary.wire.Probe/Ping" in str(raised.value)


async def test_a_peer_starting_where_one_was_refused_is_reached_at_once(pool: ChannelPool) -> None:
    """A refused address (a peer that died, or a port another test used) must not poison channels that
    other pools open to it later: gRPC would otherwise share the failed connection and its backoff."""
    port = unused_port()
    endpoint = Endpoint("127.0.0.1", port)
    with pytest.raises(PeerUnavailable):
        await RpcClient(pool, PROBE, endpoint).call("Ping", PingRequest(), timeout=5)
    server = RpcServer(WireSettings(tls=False, listen_host="127.0.0.1", port=port), Identity.generate())
    await server.start()
    try:
        async with ChannelPool(WireSettings(tls=False, default_timeout=5)) as fresh_pool:
            await assert_serving(fresh_pool, server)
        started = time.monotonic()
        while True:  # the refused pool's own channel reconnects within its bounded backoff
            try:
                await assert_serving(pool, server)
                break
            except PeerUnavailable:
                assert time.monotonic() - started < 10, "the old channel stayed in backoff"
                await asyncio.sleep(0.2)
    finally:
        await server.stop(0)


async def test_slow_handler_hits_the_deadline(pool: ChannelPool, server: RpcServer, trouble: Trouble) -> None:
    client = RpcClient(pool, TROUBLE, server.local_endpoint)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        await client.call("Sleep", PingRequest(), timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert isinstance(raised.value, TimeoutError)  # callers may catch the builtin
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(trouble.sleep_cancelled.wait(), 5)  # the server stopped working on it
    await assert_serving(pool, server)


async def test_a_call_in_flight_survives_its_channel_being_replaced(server: RpcServer) -> None:
    """The pool replaces a peer's channels (to dial it afresh) while a call to it runs: the call
    still gets its answer (closing the channel under it failed it, which a DHT node counted
    against a peer that answers), and the next call dials a new channel."""
    quick = RpcServer(WireSettings(tls=False, listen_host="127.0.0.1"), Identity.generate())
    quick.add_service(TROUBLE, Trouble(sleep_seconds=1.0))
    await quick.start()
    try:
        async with ChannelPool(WireSettings(tls=False, default_timeout=10)) as pool:
            client = RpcClient(pool, TROUBLE, quick.local_endpoint)
            call = asyncio.ensure_future(client.call("Sleep", PingRequest(), timeout=10))
            await asyncio.sleep(0.3)
            await pool.discard(quick.local_endpoint)
            assert (await call).peer_id == "slept"
            await assert_serving(pool, quick)
    finally:
        await quick.stop(0)


async def test_client_default_timeout_applies(server: RpcServer) -> None:
    async with ChannelPool(WireSettings(tls=False, default_timeout=0.3)) as short:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await RpcClient(short, TROUBLE, server.local_endpoint).call("Sleep", PingRequest())
        assert time.monotonic() - started < 3


async def test_handler_crash_is_remote_failure(pool: ChannelPool, server: RpcServer) -> None:
    with pytest.raises(RemoteFailure) as raised:
        await RpcClient(pool, TROUBLE, server.local_endpoint).call("Crash", PingRequest())
    assert raised.value.code == grpc.StatusCode.INTERNAL
    assert "RuntimeError: the disk is on fire" in str(raised.value)
    await assert_serving(pool, server)


async def test_stream_handler_crash_after_some_replies(pool: ChannelPool, server: RpcServer) -> None:
    received = []
    with pytest.raises(RemoteFailure, match="KeyError"):
        async for reply in RpcClient(pool, TROUBLE, server.local_endpoint).stream("CountThenCrash", PingRequest()):
            received.append(reply.peer_id)
    assert received == ["0", "1", "2"]
    await assert_serving(pool, server)


async def test_invalid_request_is_request_rejected_with_its_message(pool: ChannelPool, server: RpcServer) -> None:
    client = RpcClient(pool, TROUBLE, server.local_endpoint)
    with pytest.raises(RequestRejected, match=r"field 'count' must be positive, got -3") as raised:
        await client.call("Reject", PingRequest())
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(OverLimit, match="max_items=100") as raised:
        await client.call("TooLarge", PingRequest())
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_serving(pool, server)


async def test_unknown_method_name_is_a_local_error(pool: ChannelPool, server: RpcServer) -> None:
    with pytest.raises(KeyError, match="Nope"):
        await RpcClient(pool, PROBE, server.local_endpoint).call("Nope", PingRequest())


async def test_channel_pool_reuses_one_channel_per_endpoint(server: RpcServer) -> None:
    pool = ChannelPool(WireSettings(tls=False, default_timeout=10))
    endpoint = server.local_endpoint
    channel = pool.channel(endpoint)
    assert pool.channel(Endpoint("127.0.0.1", endpoint.port)) is channel  # equal endpoints, same channel
    client = RpcClient(pool, PROBE, endpoint)
    for _ in range(3):
        await client.call("Ping", PingRequest())
    assert pool.channel(endpoint) is channel
    other = pool.channel(Endpoint("127.0.0.1", unused_port()))
    assert other is not channel

    await pool.close()
    with pytest.raises(grpc.aio.UsageError):  # the old channel is closed
        await channel.unary_unary("/apiary.wire.Probe/Ping")(b"", timeout=5)
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert other.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    fresh = pool.channel(endpoint)  # a closed pool hands out new channels
    assert fresh is not channel
    assert (await client.call("Ping", PingRequest())).peer_id == server.identity.peer_id

    await pool.discard(endpoint)
    assert pool.channel(endpoint) is not fresh
    await eventually(lambda: fresh.get_state() == grpc.ChannelConnectivity.SHUTDOWN)  # no call in flight: closed
    await pool.close()


async def test_bulk_round_trip_with_tensors_in_the_reply(server: RpcServer, bulk: BulkClient) -> None:
    assert server.announced_bulk is not None
    sent = [torch.randn(33, 7, dtype=torch.float64), torch.arange(5, dtype=torch.uint8), torch.empty(0, 3)]
    body, tensors = await bulk.call(
        Endpoint("127.0.0.1", server.announced_bulk.port), "test/echo", body=b"abc",
        tensors=[tensor_payload(t) for t in sent],
    )  # fmt: skip
    assert body == b"cba"
    for (header, payload), expected in zip(tensors, sent, strict=True):
        assert_bit_exact(tensor_from_payload(header, payload), expected)


async def test_bulk_to_a_closed_port_is_peer_unavailable(bulk: BulkClient) -> None:
    started = time.monotonic()
    with pytest.raises(PeerUnavailable) as raised:
        await bulk.call(Endpoint("127.0.0.1", unused_port()), "test/echo", timeout=20)
    assert time.monotonic() - started < 5
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


async def test_bulk_deadline_and_handler_errors(pool: ChannelPool, server: RpcServer, bulk: BulkClient) -> None:
    assert server.bulk is not None
    endpoint = Endpoint("127.0.0.1", server.bulk.port)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        await bulk.call(endpoint, "test/slow", timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert isinstance(raised.value, TimeoutError)

    with pytest.raises(RemoteFailure, match="ZeroDivisionError: averaging weight is zero") as failed:
        await bulk.call(endpoint, "test/crash")
    assert failed.value.code == grpc.StatusCode.INTERNAL

    with pytest.raises(RequestRejected, match="field 'group' is empty") as rejected:
        await bulk.call(endpoint, "test/reject")
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT

    body, _ = await bulk.call(endpoint, "test/echo", body=b"still here")
    assert body == b"ereh llits"
    await assert_serving(pool, server)



def _connections_to(servers: list[RpcServer]) -> int:
    """Open TCP connections this process dialled to the servers' gRPC ports."""
    ports = {server.local_endpoint.port for server in servers}
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED)


async def _servers(count: int, settings: WireSettings) -> list[RpcServer]:
    servers = [RpcServer(settings, Identity.generate()) for _ in range(count)]
    for server in servers:
        await server.start()
    return servers


async def test_a_pool_keeps_at_most_max_channels_open_and_still_reaches_every_peer() -> None:
    servers = await _servers(6, WireSettings(tls=False, listen_host="127.0.0.1", bulk=False))
    try:
        async with ChannelPool(WireSettings(tls=False, default_timeout=10, max_channels=2)) as pool:
            for _ in range(2):  # a second pass redials the peers whose channels were closed
                for server in servers:
                    reply = await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest())
                    assert reply.peer_id == server.identity.peer_id
                    assert pool.open_channels <= 2
            await eventually(lambda: _connections_to(servers) <= 2)  # the least recently used closed
    finally:
        for server in servers:
            await server.stop(0)


async def test_idle_connections_close_at_either_end_and_the_next_call_dials_again() -> None:
    # the client's own timeout closes its connection; a server closes one its client keeps idle for too long
    quick, patient = WireSettings(tls=False, idle_connection_timeout=1.0), WireSettings(tls=False, idle_connection_timeout=600)
    impatient_server = WireSettings(tls=False, listen_host="127.0.0.1", bulk=False, idle_connection_timeout=1.0)
    patient_server = WireSettings(tls=False, listen_host="127.0.0.1", bulk=False, idle_connection_timeout=600)
    for client, served in ((quick, patient_server), (patient, impatient_server)):
        servers = await _servers(1, served)
        try:
            async with ChannelPool(client) as pool:
                caller = RpcClient(pool, PROBE, servers[0].local_endpoint)
                await caller.call("Ping", PingRequest())
                assert _connections_to(servers) == 1
                await eventually(lambda: _connections_to(servers) == 0)  # idle: closed
                assert (await caller.call("Ping", PingRequest())).peer_id == servers[0].identity.peer_id
                assert _connections_to(servers) == 1
        finally:
            await servers[0].stop(0)
