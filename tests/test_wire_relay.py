"""Relays (apiary.wire.relay): a peer that holds reservations is reached through them, end to end.

Real RpcServers and sockets on loopback: a relay (an RpcServer with `relay` on, in this process
or in `peer_server` processes where one is SIGKILLed), a target that keeps `Reservations` there,
and dialers that know nothing but the target's relayed endpoint. TLS runs from the dialer to
the target: a tap in front of the relay sees ciphertext only, and a relay that splices to an
impostor is refused. Limits, a private run's strangers and garbage on the relay port are refused
with the reason named, and the relay keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from wire_helpers.peers import PeerProcess

from apiary.wire import (
    PROBE,
    AccessDenied,
    ChannelPool,
    Endpoint,
    Identity,
    OverLimit,
    PeerAddress,
    PeerUnavailable,
    RpcClient,
    RpcServer,
    WireSettings,
)
from apiary.wire.auth import AccessToken
from apiary.wire.bulk import BulkClient
from apiary.wire.framing import Connection
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.relay_pb2 import BULK, ClientFrame, RelayFrame
from apiary.wire.protos.wire_pb2 import PingRequest, SinkReply, SinkRequest, TensorChunk, TensorHeader
from apiary.wire.relay import Reservations
from apiary.wire.relay.protocol import MAGIC, connect_tcp, receive, send
from apiary.wire.relay.reservations import reserve
from apiary.wire.relay.splice import splice

# no hole punching: every byte goes through the relay here (punching: tests/test_wire_punch.py)
BASE = WireSettings(listen_host="127.0.0.1", default_timeout=10, shutdown_grace=0.2, relay_punch=False)
MARKER = b"apiary-relay-known-tensor-bytes!"  # 32 bytes, repeated to make the tensor


@contextlib.asynccontextmanager
async def serving(settings: WireSettings = BASE, identity: Identity | None = None,
                  registry: CollectorRegistry | None = None) -> AsyncIterator[RpcServer]:
    server = RpcServer(settings, identity or Identity.generate(), registry=registry)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` holds (AssertionError naming `what` after `timeout`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def reservations(target: RpcServer, relays: list[PeerAddress], count: int = 1,
                       **options: Any) -> AsyncIterator[Reservations]:
    async def listed() -> list[PeerAddress]:
        return relays

    pool = ChannelPool.like(target)
    held = Reservations(target, pool, listed, count=count, **options)
    await held.start()
    try:
        await eventually(lambda: len(held.endpoints) >= count, 10, "reservations held")
        yield held
    finally:
        await held.stop()
        await pool.close()


async def ping(pool: ChannelPool, endpoint: Endpoint) -> str:
    return (await RpcClient(pool, PROBE, endpoint, timeout=10).call("Ping", PingRequest())).peer_id


def tensor(nbytes: int) -> tuple[TensorHeader, memoryview]:
    data = (MARKER * (nbytes // len(MARKER) + 1))[:nbytes]
    return TensorHeader(dtype="uint8", shape=[nbytes], nbytes=nbytes), memoryview(bytearray(data))


async def bulk_sink(client: BulkClient, endpoint: Endpoint, nbytes: int) -> int:
    body, _ = await client.call(endpoint, SINK_ROUTE, body=SinkRequest(digest=True).SerializeToString(),
                                tensors=[tensor(nbytes)], timeout=30)
    return SinkReply.FromString(body).total_bytes


async def grpc_sink(pool: ChannelPool, endpoint: Endpoint, nbytes: int) -> int:
    header, data = tensor(nbytes)

    async def chunks() -> AsyncIterator[TensorChunk]:
        yield TensorChunk(header=header, data=bytes(data))

    reply = await RpcClient(pool, PROBE, endpoint, timeout=30).call("Sink", chunks())
    return reply.total_bytes


def framed(frame: bytes) -> bytes:
    return len(frame).to_bytes(4, "big") + frame


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_reserved_peer_is_called_over_grpc_and_bulk_through_the_relay_alone() -> None:
    registry = CollectorRegistry()
    async with serving(BASE.model_copy(update={"relay": True}), registry=registry) as relay, serving() as target:
        assert relay.relay_address is not None and relay.relay_address.peer_id == relay.identity.peer_id
        async with reservations(target, [relay.relay_address]) as held:
            [endpoint] = held.endpoints
            assert endpoint.relayed and endpoint.direct == relay.relay_address.endpoint
            assert endpoint.target_peer == target.identity.peer_id
            assert metric(registry, "apiary_wire_relay_reservations") == 1
            async with ChannelPool(BASE) as pool:
                assert await ping(pool, endpoint) == target.identity.peer_id  # no peer id given: the target's
                assert await grpc_sink(pool, endpoint, 1 << 20) == 1 << 20
                client = BulkClient(BASE)
                try:
                    assert await bulk_sink(client, endpoint, 8 << 20) == 8 << 20
                    assert metric(registry, "apiary_wire_relay_circuits") == 2  # the channel's and the bulk one
                finally:
                    await client.close()
            assert relay.relay is not None and relay.relay.circuits_opened == 2
            assert metric(registry, "apiary_wire_relay_circuits_opened_total") == 2
            assert metric(registry, "apiary_wire_relay_bytes_total") > 9 << 20
            await eventually(lambda: metric(registry, "apiary_wire_relay_circuits") == 0, 5, "circuits closed")


async def test_keepalives_keep_a_reservation_and_a_silent_one_is_dropped() -> None:
    settings = BASE.model_copy(update={"relay": True, "relay_reservation_timeout": 1.5})
    async with serving(settings) as relay, serving() as target:
        assert relay.relay_address is not None and relay.relay is not None
        changes: list[float] = []
        async with reservations(target, [relay.relay_address], keepalive=0.5, timeout=0.5,
                                on_change=lambda: changes.append(time.monotonic())) as held:
            await asyncio.sleep(3)  # six keepalives, two relay timeouts
            assert len(changes) == 1 and relay.relay.reservations == 1
            async with ChannelPool(BASE) as pool:
                assert await ping(pool, held.endpoints[0]) == target.identity.peer_id
        connection, reserved = await reserve(relay.relay_address, Identity.generate(), None, 5)  # then silent
        try:
            assert reserved.idle_timeout == 1.5 and relay.relay.reservations == 1
            assert await eventually(lambda: relay.relay.reservations == 0, 5, "silent reservation dropped") > 1
        finally:
            connection.close()


class Tap:
    """A TCP proxy in front of a port that keeps every byte it forwards, both ways; it connects
    from `source_host` (another address of this host: another host to the port's server)."""

    def __init__(self, port: int, source_host: str = "127.0.0.1"):
        self.port, self.source_host, self.captured = port, source_host, bytearray()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Tap:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                         local_addr=(self.source_host, 0))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(1 << 16):
                    self.captured += data
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
async def test_the_relay_forwards_ciphertext_only(tls: bool) -> None:
    """Both sides of the relay are tapped; with TLS (the default) the tensor's bytes never pass
    in the clear (in plaintext, the control case, they do: the tap sees what the relay sees)."""
    settings = BASE.model_copy(update={"tls": tls})
    async with serving(settings.model_copy(update={"relay": True})) as relay, serving(settings) as target:
        assert relay.relay_address is not None
        relay_endpoint = relay.relay_address.endpoint
        async with Tap(relay_endpoint.port) as target_side, Tap(relay_endpoint.port) as dialer_side:
            tapped = PeerAddress(Endpoint("127.0.0.1", target_side.listen_port), relay.identity.peer_id)
            async with reservations(target, [tapped]) as held:
                endpoint = Endpoint("127.0.0.1", dialer_side.listen_port, relay.identity.peer_id,
                                    held.endpoints[0].target_peer)
                async with ChannelPool(settings) as pool:
                    assert await grpc_sink(pool, endpoint, 1 << 20) == 1 << 20
                client = BulkClient(settings)
                try:
                    assert await bulk_sink(client, endpoint, 4 << 20) == 4 << 20
                finally:
                    await client.close()
        for side in (dialer_side, target_side):
            assert len(side.captured) > 5 << 20  # both tensors went through each tap
            assert (MARKER in side.captured) is not tls


async def test_relayed_dialers_on_other_hosts_do_not_share_the_targets_per_peer_limits() -> None:
    """Relayed gRPC calls reach the target's gRPC port from its own host: each dialer's host
    (as the relay saw it) gets its own rate limit there, and one over it is still refused."""
    limited = BASE.model_copy(update={"max_requests_per_second": 0.001, "request_burst": 2})
    async with serving(BASE.model_copy(update={"relay": True})) as relay, serving(limited) as target:
        assert relay.relay_address is not None
        port = relay.relay_address.endpoint.port
        async with (reservations(target, [relay.relay_address]) as held,
                    Tap(port, source_host="127.0.0.2") as first, Tap(port, source_host="127.0.0.3") as second):
            for dialer_host in (first, second):
                endpoint = Endpoint("127.0.0.1", dialer_host.listen_port, relay.identity.peer_id,
                                    held.endpoints[0].target_peer)
                async with ChannelPool(BASE) as pool:
                    for _ in range(2):  # its burst
                        assert await ping(pool, endpoint) == target.identity.peer_id
                    with pytest.raises(OverLimit, match="max_requests_per_second"):
                        await ping(pool, endpoint)


async def test_a_relay_cannot_answer_as_the_target() -> None:
    """A hostile relay that splices circuits to an impostor (another identity) instead of the
    target: the dialer's TLS, bound to the target's peer id, refuses it (gRPC and bulk)."""
    relay_identity, target_identity = Identity.generate(), Identity.generate()
    async with serving() as impostor:
        assert impostor.bulk is not None
        ports = {BULK: impostor.bulk.port}

        async def hostile(sock: socket.socket) -> None:
            connection = Connection(sock)
            await connection.read_exactly(len(MAGIC))
            await send(connection, RelayFrame(greeting={"relay_peer": relay_identity.peer_id, "nonce": bytes(16)}))
            request = await receive(connection, ClientFrame)
            await send(connection, RelayFrame(connected={"circuit_id": "hostile"}))
            local = await connect_tcp(Endpoint("127.0.0.1", ports.get(request.connect.kind, impostor.port)))
            await splice(sock, local)

        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []

        async def accept() -> None:
            while True:
                sock, _ = await loop.sock_accept(listener)
                tasks.append(asyncio.ensure_future(hostile(sock)))

        acceptor = asyncio.ensure_future(accept())
        endpoint = Endpoint("127.0.0.1", listener.getsockname()[1], relay_identity.peer_id, target_identity.peer_id)
        try:
            async with ChannelPool(BASE) as pool:
                with pytest.raises(PeerUnavailable, match=f"did not prove peer id {target_identity.peer_id}"):
                    await ping(pool, endpoint)
            client = BulkClient(BASE)
            try:
                with pytest.raises(PeerUnavailable, match=f"proved identity {impostor.identity.peer_id}, "
                                                          f"not {target_identity.peer_id}"):
                    await bulk_sink(client, endpoint, 1024)
            finally:
                await client.close()
        finally:
            for task in [acceptor, *tasks]:
                task.cancel()
            await asyncio.gather(acceptor, *tasks, return_exceptions=True)
            listener.close()


async def test_limits_refuse_reservations_and_circuits_naming_the_limit() -> None:
    registry = CollectorRegistry()
    limited = BASE.model_copy(update={"relay": True, "relay_max_reservations": 1, "relay_max_circuits": 1})
    async with serving(limited, registry=registry) as relay, serving() as target:
        assert relay.relay_address is not None
        async with reservations(target, [relay.relay_address]) as held:
            with pytest.raises(OverLimit, match="refused \\(reservations\\).*relay_max_reservations=1"):
                await reserve(relay.relay_address, Identity.generate(), None, 5)
            [endpoint] = held.endpoints
            first = BulkClient(BASE)
            try:
                assert await bulk_sink(first, endpoint, 1024) == 1024  # its connection stays open: the one circuit
                second = BulkClient(BASE)
                try:
                    with pytest.raises(OverLimit, match="refused \\(circuits\\).*relay_max_circuits=1"):
                        await bulk_sink(second, endpoint, 1024)
                finally:
                    await second.close()
                async with ChannelPool(BASE) as pool:
                    with pytest.raises(OverLimit, match="refused \\(circuits\\).*relay_max_circuits=1"):
                        await ping(pool, endpoint)
            finally:
                await first.close()
            async with ChannelPool(BASE) as pool:  # the circuit closed: room again
                await eventually(lambda: relay.relay is not None and relay.relay.circuits == 0, 5, "circuit closed")
                assert await ping(pool, endpoint) == target.identity.peer_id
        assert metric(registry, "apiary_wire_relay_refused_total", reason="reservations") == 1
        assert metric(registry, "apiary_wire_relay_refused_total", reason="circuits") == 2


async def test_one_host_holding_handshakes_open_is_refused_and_others_are_served() -> None:
    registry = CollectorRegistry()
    limited = BASE.model_copy(update={"relay": True, "relay_max_handshakes_per_peer": 3})
    async with serving(limited, registry=registry) as relay, serving() as target:
        assert relay.relay_address is not None
        relay_endpoint, loop = relay.relay_address.endpoint, asyncio.get_running_loop()

        async def greeted(source_host: str) -> RelayFrame:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((source_host, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (relay_endpoint.host, relay_endpoint.port))
            connection = Connection(sock)
            try:
                await connection.send(MAGIC)
                async with asyncio.timeout(5):
                    return await receive(connection, RelayFrame)
            finally:
                connection.close()

        silent = [await connect_tcp(relay_endpoint) for _ in range(3)]  # connected, never a magic line
        try:
            with pytest.raises(OverLimit, match="refused \\(handshakes_per_peer\\).*host 127.0.0.1 .*"
                                                "relay_max_handshakes_per_peer=3"):
                await reserve(relay.relay_address, Identity.generate(), None, 5)
            assert (await greeted("127.0.0.2")).WhichOneof("frame") == "greeting"  # another host is served
        finally:
            for sock in silent:
                sock.close()
        async with reservations(target, [relay.relay_address]) as held, ChannelPool(BASE) as pool:
            assert await ping(pool, held.endpoints[0]) == target.identity.peer_id  # that host is served again
        assert metric(registry, "apiary_wire_relay_refused_total", reason="handshakes_per_peer") == 1


@pytest.mark.parametrize("limit", ["relay_circuit_bytes_per_second", "relay_bytes_per_second"])
async def test_byte_rates_pace_what_the_relay_carries(limit: str) -> None:
    rate = 4 << 20  # a second's worth may pass at once, the rest at the rate
    async with serving(BASE.model_copy(update={"relay": True, limit: rate})) as relay, serving() as target:
        assert relay.relay_address is not None
        async with reservations(target, [relay.relay_address]) as held:
            client = BulkClient(BASE)
            try:
                started = time.monotonic()
                assert await bulk_sink(client, held.endpoints[0], 12 << 20) == 12 << 20
                assert time.monotonic() - started > 1.6  # (12 - 4) MiB at 4 MiB/s: 2 s
            finally:
                await client.close()


async def test_a_private_run_relays_for_token_holders_only() -> None:
    authority = Identity.generate()

    def member(identity: Identity, **update: object) -> WireSettings:
        token = AccessToken.issue(authority, identity.peer_id, 3600).encode()
        return BASE.model_copy(update={"run_authority": authority.peer_id, "access_token": token, **update})

    relay_id, target_id, dialer_id, stranger_id = (Identity.generate() for _ in range(4))
    async with serving(member(relay_id, relay=True), relay_id) as relay, serving(member(target_id), target_id) as target:
        assert relay.relay_address is not None and relay.relay is not None
        with pytest.raises(AccessDenied, match="token_missing"):
            await reserve(relay.relay_address, stranger_id, None, 5)
        async with reservations(target, [relay.relay_address]) as held:
            [endpoint] = held.endpoints
            async with ChannelPool(BASE, identity=stranger_id) as stranger:
                with pytest.raises(AccessDenied, match="refused \\(access_token_missing\\)"):
                    await ping(stranger, endpoint)
            async with ChannelPool(member(dialer_id), identity=dialer_id) as pool:
                assert await ping(pool, endpoint) == target.identity.peer_id
            client = BulkClient(member(dialer_id), identity=dialer_id)
            try:
                assert await bulk_sink(client, endpoint, 1024) == 1024
            finally:
                await client.close()
        assert relay.relay.refused["access_token_missing"] == 2


async def test_when_its_relay_is_killed_a_reservation_moves_to_another_within_seconds() -> None:
    relays = [PeerProcess(["--tls", "--relay"]).start() for _ in range(2)]
    try:
        addresses = {p.peer_id: PeerAddress(Endpoint("127.0.0.1", p.info["relay_port"]), p.peer_id) for p in relays}
        async with serving() as target, reservations(target, list(addresses.values())) as held:
            [first] = held.endpoints
            async with ChannelPool(BASE) as pool:
                assert await ping(pool, first) == target.identity.peer_id
                next(p for p in relays if p.peer_id == first.relay_peer).crash()
                moved = await eventually(lambda: [e.relay_peer for e in held.endpoints] == [
                    next(p for p in addresses if p != first.relay_peer)], 5, "the reservation moved")
                assert moved < 5
                assert await ping(pool, held.endpoints[0]) == target.identity.peer_id
    finally:
        for process in relays:
            process.stop()


async def test_garbage_on_the_relay_port_is_refused_and_the_relay_keeps_serving() -> None:
    async with serving(BASE.model_copy(update={"relay": True})) as relay, serving() as target:
        assert relay.relay_address is not None and relay.relay is not None
        relay_endpoint = relay.relay_address.endpoint
        garbage = [
            b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",  # not the magic line
            MAGIC + b"\xff\xff\xff\xff",  # a frame of 4 GiB declared
            MAGIC + b"\x00\x00\x00\x05\xff\xfe\xfd\xfc\xfb",  # a frame that is not protobuf
            MAGIC + b"\x00\x00\x00\x00",  # an empty frame: neither reserve, connect nor accept
            MAGIC + framed(ClientFrame(accept={"circuit_id": "none"}).SerializeToString()),  # no such circuit
        ]
        for junk in garbage:
            sock = await connect_tcp(relay_endpoint)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, junk)
            answer = b""
            async with asyncio.timeout(5):  # the relay answers and closes
                while data := await loop.sock_recv(sock, 1 << 16):
                    answer += data
            sock.close()
            assert b"malformed" in answer or b"unknown_circuit" in answer, (junk, answer)
        assert relay.relay.refused["malformed"] == 4 and relay.relay.refused["unknown_circuit"] == 1
        async with reservations(target, [relay.relay_address]) as held, ChannelPool(BASE) as pool:
            assert await ping(pool, held.endpoints[0]) == target.identity.peer_id
