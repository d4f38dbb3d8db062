"""Direct connection upgrade (apiary.wire.relay.punch): peers that reach each other through a
relay move to a direct connection, and stay relayed when it cannot be made.

Real RpcServers and sockets on loopback: a relay, a target holding a reservation there, and a
dialer that knows only the target's relayed endpoint. Once a punch succeeded, new gRPC calls
and new bulk connections go direct: the relay carries no more bytes. A target that does not
answer punches leaves the dialer relayed, calls still work, and the peer is not punched again.
A punch never makes the target dial another host than the dialer's, and a stray connection to
a punch port is not taken.
The same with real NATs (cone: direct; symmetric: relayed) is tests/test_net_punch.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from test_wire_relay import BASE, bulk_sink, eventually, grpc_sink, metric, ping, reservations, serving

from apiary.wire import PROBE, ChannelPool, Endpoint, RpcClient
from apiary.wire.bulk import BulkClient
from apiary.wire.protos.relay_pb2 import GRPC, PUNCH
from apiary.wire.protos.wire_pb2 import TensorChunk, TensorHeader
from apiary.wire.relay.dial import open_circuit
from apiary.wire.relay.protocol import reusable_socket
from apiary.wire.relay.punch import DIRECT_MAGIC, Offer, connect_direct

PUNCHING = BASE.model_copy(update={"relay_punch": True})  # the default, off in test_wire_relay's BASE
RELAY = PUNCHING.model_copy(update={"relay": True})


async def test_punched_peers_move_new_grpc_calls_and_bulk_connections_off_the_relay() -> None:
    async with (serving(RELAY) as relay, serving(PUNCHING) as target,
                reservations(target, [relay.relay_address]) as held):
        assert relay.relay is not None
        [endpoint] = held.endpoints
        async with ChannelPool(PUNCHING) as pool:
            registry = CollectorRegistry()
            pool.puncher.export(registry)
            client = BulkClient(PUNCHING, puncher=pool.puncher)
            try:
                assert await ping(pool, endpoint) == target.identity.peer_id  # through the relay: a punch starts
                assert await bulk_sink(client, endpoint, 1 << 20) == 1 << 20
                await eventually(lambda: pool.puncher.succeeded == 2, 10, "a grpc and a bulk punch")
                assert await ping(pool, endpoint) == target.identity.peer_id  # the new channel: direct
                assert await bulk_sink(client, endpoint, 1 << 20) == 1 << 20  # the relayed connection let go
                await eventually(lambda: relay.relay.circuits == 0, 15, "every circuit closed")
                carried = relay.relay.bytes_relayed
                for _ in range(3):
                    assert await grpc_sink(pool, endpoint, 1 << 20) == 1 << 20
                    assert await bulk_sink(client, endpoint, 4 << 20) == 4 << 20
                assert relay.relay.bytes_relayed == carried  # not one byte more through the relay
                assert relay.relay.circuits == 0
            finally:
                await client.close()
            assert (pool.puncher.attempted, pool.puncher.succeeded, pool.puncher.failed) == (2, 2, 0)
            assert metric(registry, "apiary_wire_punches_total", outcome="succeeded") == 2
            assert metric(registry, "apiary_wire_punches_total", outcome="failed") == 0


async def test_a_call_in_flight_when_the_channel_moves_finishes_on_the_relayed_one() -> None:
    async with (serving(RELAY) as relay, serving(PUNCHING) as target,
                reservations(target, [relay.relay_address]) as held):
        [endpoint] = held.endpoints
        async with ChannelPool(PUNCHING) as pool:
            header = TensorHeader(dtype="uint8", shape=[64 * 1024], nbytes=64 * 1024)

            async def slow_chunks() -> AsyncIterator[TensorChunk]:
                yield TensorChunk(header=header, data=bytes(32 * 1024))
                await eventually(lambda: pool.puncher.succeeded == 1, 10, "the punch")  # the channel moves now
                await asyncio.sleep(0.3)
                yield TensorChunk(data=bytes(32 * 1024))

            reply = await RpcClient(pool, PROBE, endpoint, timeout=20).call("Sink", slow_chunks())
            assert reply.total_bytes == 64 * 1024
            assert await ping(pool, endpoint) == target.identity.peer_id  # and the next call goes direct
            await eventually(lambda: relay.relay is not None and relay.relay.circuits == 0, 15, "circuits closed")


async def test_a_failed_punch_leaves_calls_relayed_and_the_peer_is_not_punched_again() -> None:
    silent = BASE  # takes no punch circuits (relay_punch off, or an older peer)
    quick = PUNCHING.model_copy(update={"default_timeout": 2.0})
    async with (serving(RELAY) as relay, serving(silent) as target,
                reservations(target, [relay.relay_address]) as held):
        assert relay.relay is not None
        [endpoint] = held.endpoints
        async with ChannelPool(quick) as pool:
            client = BulkClient(quick, puncher=pool.puncher)
            try:
                assert await ping(pool, endpoint) == target.identity.peer_id
                await eventually(lambda: pool.puncher.failed == 1, 10, "the punch failed")
                carried = relay.relay.bytes_relayed
                assert await grpc_sink(pool, endpoint, 1 << 20) == 1 << 20  # still relayed, still working
                assert await bulk_sink(client, endpoint, 1 << 20) == 1 << 20  # a new relayed connection
                assert relay.relay.bytes_relayed > carried + (2 << 20)
                await asyncio.sleep(0.5)
                assert (pool.puncher.attempted, pool.puncher.succeeded) == (1, 0)  # the peer stays relayed
            finally:
                await client.close()


async def test_a_target_never_dials_an_address_on_another_host_than_the_dialers() -> None:
    loop = asyncio.get_running_loop()
    async with (serving(RELAY) as relay, serving(PUNCHING) as target,
                reservations(target, [relay.relay_address]) as held):
        [endpoint] = held.endpoints
        victim = socket.create_server(("127.0.0.2", 0))  # a third party the offer points at
        victim.setblocking(False)
        circuit = await open_circuit(endpoint, kind=PUNCH, credentials=None, timeout=10)
        try:
            offer = Offer(GRPC, b"n" * 16, Endpoint("127.0.0.2", victim.getsockname()[1]))
            await loop.sock_sendall(circuit, offer.encode())
            assert await asyncio.wait_for(loop.sock_recv(circuit, 100), 10) == b""  # refused: no answer, closed
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_accept(victim), 1.0)
        finally:
            circuit.close()
            victim.close()


def free_port() -> int:
    with reusable_socket(socket.AF_INET, 0) as sock:
        return sock.getsockname()[1]


async def test_a_stray_connection_to_the_punch_port_is_not_taken() -> None:
    loop = asyncio.get_running_loop()
    dialer_port, target_port = free_port(), free_port()
    dialer_nonce, target_nonce = b"d" * 16, b"t" * 16
    target = asyncio.ensure_future(connect_direct(target_port, Endpoint("127.0.0.1", dialer_port), target_nonce,
                                                  dialer_nonce, dialer=False))
    await asyncio.sleep(0.2)  # the target listens and tries to connect (refused: nobody on the dialer's port)
    stray = socket.create_connection(("127.0.0.1", target_port))
    stray.sendall(DIRECT_MAGIC + b"x" * 16)  # a wrong nonce
    direct = await connect_direct(dialer_port, Endpoint("127.0.0.1", target_port), dialer_nonce, target_nonce,
                                  dialer=True)
    taken = await target
    assert direct is not None and taken is not None
    try:
        assert taken.getpeername() == direct.getsockname()[:2] or taken.getpeername()[1] == dialer_port
        await loop.sock_sendall(direct, b"hello")
        assert await asyncio.wait_for(loop.sock_recv(taken, 5), 5) == b"hello"
        stray.settimeout(5)
        assert stray.recv(100) == b""  # closed, and told nothing
    finally:
        for sock in (direct, taken, stray):
            sock.close()
